"""The CLI contract: quantize -> eval on a local folder, JSON keys, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import pytest
import torch

from conftest import SAMPLE_TEXT
from lowbit.cli.main import main

EVAL_KEYS = {
    "perplexity",
    "tokens",
    "kl_to_reference",
    "top1_agreement",
    "total_bytes",
    "bits_per_weight",
    "bits_per_weight_linear",
}


def _run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _safetensors_layout(path):
    """(header bytes incl. the 8-byte length, {tensor: (dtype, shape, data bytes)}) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    tensors = {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}
    return 8 + n, tensors


def _expected_ternary_g32_bytes(model_dir, tensors):
    """Bytes of the tiny Llama at ternary group 32 from first principles (docs/methods.md, "Byte
    counting"): per linear base-3 codes, 5 per byte per row, and one step per 32 inputs (fp16, or fp32
    where the file stores fp32); the tied embedding once and the norms in fp16."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}  # fmt: skip
    total = vocab * h * 2 + (2 * cfg["num_hidden_layers"] + 1) * h * 2
    for layer in range(cfg["num_hidden_layers"]):
        for name, (rows, cols) in shapes.items():
            step_dtype = tensors[f"model.layers.{layer}.{name}.step"][0]
            total += rows * math.ceil(cols / 5) + rows * math.ceil(cols / 32) * {"F16": 2, "F32": 4}[step_dtype]
    return total


def _direct_eval(quantized_dir, reference_dir, seq_len):
    """Perplexity, KL(P_ref || P_q) and top-1 agreement computed here with plain torch on the same
    windows lowbit cuts (docs/methods.md, "Perplexity windows")."""
    from lowbit.api import load

    model, tokenizer, _ = load(str(quantized_dir))
    ref, _, _ = load(str(reference_dir))
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    n_windows = len(ids) // seq_len
    windows = torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len)
    with torch.no_grad():
        logp = model(input_ids=windows).logits[:, :-1].float().log_softmax(-1)
        ref_logp = ref(input_ids=windows).logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    top1 = (ref_logp.argmax(-1) == logp.argmax(-1)).double().mean().item()
    return {"perplexity": math.exp(nll), "kl_to_reference": kl, "top1_agreement": top1,
            "tokens": n_windows * (seq_len - 1), "windows": n_windows}  # fmt: skip


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    "method,extra", [("rtn", []), ("gptq", ["--calib", "SAMPLE", "--calib-tokens", "256", "--seq-len", "32"])]
)
def test_quantize_then_eval_json(capsys, tmp_path, tiny_model_dir, sample_text_file, method, extra):
    out_dir = tmp_path / "q"
    extra = [sample_text_file if a == "SAMPLE" else a for a in extra]  # --calib only applies to gptq
    code, out, err = _run(
        capsys, "quantize", "--model", tiny_model_dir, "--bits", "ternary", "--method", method,
        "--group-size", "32", *extra, "--out", out_dir, "--json",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out)
    assert record["method"] == method
    header_bytes, tensors = _safetensors_layout(out_dir / "model.safetensors")
    stored = sum(nbytes for _, _, nbytes in tensors.values())
    assert record["total_bytes"] == stored == _expected_ternary_g32_bytes(out_dir, tensors)
    assert (out_dir / "model.safetensors").stat().st_size == header_bytes + stored
    code, out, err = _run(
        capsys, "eval", "--model", out_dir, "--data", sample_text_file, "--seq-len", "64", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert EVAL_KEYS <= set(result)
    assert result["reference"] == str(tiny_model_dir)  # the base model is found by default
    assert result["total_bytes"] == record["total_bytes"]  # the reloaded folder counts the same bytes
    direct = _direct_eval(out_dir, tiny_model_dir, 64)
    assert result["tokens"] == direct["tokens"] and result["windows"] == direct["windows"]
    assert result["top1_agreement"] == pytest.approx(direct["top1_agreement"], abs=1e-12)
    for key in ("perplexity", "kl_to_reference"):
        assert result[key] == pytest.approx(direct[key], rel=1e-4), key
    assert direct["kl_to_reference"] > 1e-4  # ternary changes the model: a KL of 0 would be a bug
    assert result["bits_per_weight_linear"] < 2.2
    code, out, err = _run(capsys, "info", out_dir, "--json")
    assert code == 0 and json.loads(out)["quant_config"]["bits"] == 1.58


def test_eval_full_precision_with_explicit_reference(capsys, tiny_model_dir, sample_text_file):
    code, out, err = _run(
        capsys, "eval", "--model", tiny_model_dir, "--reference", tiny_model_dir,
        "--data", sample_text_file, "--seq-len", "64", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["kl_to_reference"] == pytest.approx(0, abs=1e-6)
    assert result["bits_per_weight"] == 32.0


def test_missing_model_path(capsys, tmp_path):
    code, _, err = _run(capsys, "quantize", "--model", tmp_path / "nope", "--bits", "4", "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "nope")


@pytest.mark.parametrize("bits", ["5", "0.5", "sixteen"])
def test_unsupported_bits(capsys, tmp_path, tiny_model_dir, bits):
    code, _, err = _run(capsys, "quantize", "--model", tiny_model_dir, "--bits", bits, "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "unsupported bit-width")
    assert not (tmp_path / "o").exists()


def test_group_size_too_large(capsys, tmp_path, tiny_model_dir):
    code, _, err = _run(
        capsys, "quantize", "--model", tiny_model_dir, "--bits", "4", "--group-size", "4096", "--out", tmp_path / "o"
    )
    _assert_one_line_error(code, err, "group size 4096")


def test_group_size_not_a_number_is_a_usage_error(capsys, tmp_path, tiny_model_dir):
    code, _, err = _run(capsys, "quantize", "--model", tiny_model_dir, "--bits", "4", "--group-size", "-3", "--out", tmp_path)
    _assert_one_line_error(code, err, "quantize: argument --group-size: group size must be a positive integer")


def test_empty_and_too_short_text(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = _run(capsys, "eval", "--model", tiny_model_dir, "--data", empty)
    _assert_one_line_error(code, err, "empty")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code, _, err = _run(capsys, "eval", "--model", tiny_model_dir, "--data", short, "--seq-len", "256")
    _assert_one_line_error(code, err, "tokens")  # 256: the tiny model's positions (--seq-len 512 is refused)


def test_non_causal_model(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    path = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    code, _, err = _run(capsys, "quantize", "--model", path, "--bits", "4", "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "not a causal language model")


def test_entry_point_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "eval", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("lowbit: error:")


def test_bench_json_reports_speed_and_memory(tmp_path, tiny_model_dir, capsys):
    """lowbit bench --json: the contract keys for the packed model and the fp32 reference."""
    out = tmp_path / "q4"
    code, _, err = _run(capsys, "quantize", "--model", tiny_model_dir, "--bits", "4", "--group-size", "32",
                        "--method", "rtn", "--out", out)
    assert code == 0, err
    code, stdout, err = _run(capsys, "bench", "--model", out, "--reference", tiny_model_dir, "--prompt-tokens", "8",
                             "--new-tokens", "4", "--repeats", "1", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    # no timing assertions: speeds are only checked to be reported, as finite floats
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "decode_speedup", "prefill_speedup"):
        for k in (key, f"reference_{key}") if "speedup" not in key else (key,):
            assert isinstance(result[k], float) and math.isfinite(result[k]), k
    assert (result["prompt_tokens"], result["new_tokens"], result["activations"]) == (8, 4, "int8")
    assert result["threads"] == torch.get_num_threads() and result["engine"] in ("lowbit", "transformers")
    assert result["reference"] == str(tiny_model_dir)
    # the size account of the folder, computed here from the file's own layout: header + tensor data
    header_bytes, tensors = _safetensors_layout(out / "model.safetensors")
    stored = sum(nbytes for _, _, nbytes in tensors.values())
    assert result["size_account_bytes"] == result["file_bytes"] == header_bytes + stored
    # the fp32 reference's account: 4 bytes per parameter (tied once) plus its float buffers
    from lowbit.eval.models import load_model

    ref, _ = load_model(str(tiny_model_dir))
    params = sum(p.numel() for p in ref.parameters())
    assert 4 * params <= result["reference_size_account_bytes"] <= 4 * params + 4096
    # resident memory: growth of a fresh process; besides the stored bytes it holds the KV cache,
    # kernel workspace and allocator pages, measured at 8-9 MB extra; bound it at 32 MiB extra
    extra = 32 * 2**20
    assert 0 < result["resident_bytes"] <= result["size_account_bytes"] + extra
    assert 0 < result["reference_resident_bytes"] <= result["reference_size_account_bytes"] + extra
    assert result["resident_over_account"] == pytest.approx(result["resident_bytes"] / (header_bytes + stored))
    code, _, err = _run(capsys, "bench", "--model", out, "--activations", "int4")  # argparse: one line, exit 2
    _assert_one_line_error(code, err, "bench: argument --activations: invalid choice: 'int4'")


def test_text_output_prints_a_pipeline_report_as_one_line_per_stage(capsys):
    from lowbit.cli.main import _print

    report = {"stages": [{"stage": "budget+gptq", "seconds": 233.6, "tokens": 24576},
                         {"stage": "blockap", "seconds": 564.2, "tokens": 1044480, "blocks": [{"block": 0}]}],
              "skipped": {"e2e": "12 s left of the time budget (needs 60)"}, "plan": {"a": 1}}  # fmt: skip
    _print({"quantize_seconds": 800.0, "report": report}, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("report") and "lowbit.json" in lines[1] and "plan" not in lines[1]
    assert lines[3].split() == ["budget+gptq", "233.6", "24,576"]
    assert lines[4].split() == ["blockap", "564.2", "1,044,480"]
    assert lines[5].split()[:2] == ["e2e", "skipped"] and "time budget" in lines[5]
