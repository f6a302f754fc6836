"""The CLI contract: quantize -> eval on a local folder, JSON keys, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowbit.cli import main

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


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("method,extra", [("rtn", []), ("gptq", ["--calib-tokens", "256", "--seq-len", "32"])])
def test_quantize_then_eval_json(capsys, tmp_path, tiny_model_dir, sample_text_file, method, extra):
    out_dir = tmp_path / "q"
    code, out, err = _run(
        capsys, "quantize", "--model", tiny_model_dir, "--bits", "ternary", "--method", method,
        "--group-size", "32", "--calib", sample_text_file, *extra, "--out", out_dir, "--json",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out)
    assert record["method"] == method and record["total_bytes"] > 0
    code, out, err = _run(
        capsys, "eval", "--model", out_dir, "--data", sample_text_file, "--seq-len", "64", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert EVAL_KEYS <= set(result)
    assert result["reference"] == str(tiny_model_dir)  # the base model is found by default
    assert 0 <= result["top1_agreement"] <= 1 and result["kl_to_reference"] >= 0
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
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--group-size", "-3", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "group size must be a positive integer" in capsys.readouterr().err


def test_empty_and_too_short_text(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = _run(capsys, "eval", "--model", tiny_model_dir, "--data", empty)
    _assert_one_line_error(code, err, "empty")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code, _, err = _run(capsys, "eval", "--model", tiny_model_dir, "--data", short, "--seq-len", "512")
    _assert_one_line_error(code, err, "tokens")


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
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "resident_bytes"):
        assert result[key] > 0 and result[f"reference_{key}"] > 0, key
    assert result["activations"] == "int8"
    assert result["size_account_bytes"] == (out / "model.safetensors").stat().st_size
    assert result["resident_over_account"] == result["resident_bytes"] / result["size_account_bytes"]
    with pytest.raises(SystemExit) as exc:  # argparse: usage line + "invalid choice", exit code 2
        _run(capsys, "bench", "--model", out, "--activations", "int4")
    assert exc.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
