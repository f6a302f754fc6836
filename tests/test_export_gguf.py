"""GGUF export: metadata, names, per-tensor types, exact dequantization, fallbacks, errors, llama.cpp."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_tokenizer
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import compare_logits
from lowbit.gguf import dequantize_tensor, export_gguf
from lowbit.quant.surgery import QuantConfig, quantize_model
from lowbit.store.folder import load_quantized, save_quantized

gguf = pytest.importorskip("gguf")
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NO_LLAMA_CPP = "llama_cpp (llama-cpp-python) is not importable: pip install /tmp/llama/wheel/*.whl diskcache"

LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _llama(tok, hidden=256, inter=512, layers=2, tied=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
        rope_theta=10000.0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def make_folder(tmp_path: Path, bits, group_size=32, quantizer="auto", name="q", tweak=None, **kwargs) -> Path:
    tok = tiny_tokenizer()
    model_kw = {k: kwargs.pop(k) for k in ("hidden", "inter", "tied") if k in kwargs}
    model = _llama(tok, **model_kw)
    quantize_model(
        model, QuantConfig(bits=bits, quantizer=quantizer, group_size=group_size, scale_search="none", **kwargs)
    )
    if tweak:
        tweak(model)
    out = tmp_path / name
    save_quantized(model, tok, out)
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _lowbit_weights(folder: Path) -> dict[str, np.ndarray]:
    """What lowbit's model computes with, under GGUF names (q/k rows in llama.cpp's rope order)."""
    model, _, _ = load_quantized(folder)
    cfg = model.config
    mods = dict(model.named_modules())
    out = {}
    with torch.no_grad():

        def weight(name):
            m = mods[name]
            return (m.quantizer(m.weight) if hasattr(m, "quantizer") else m.weight).float().numpy()

        out["token_embd.weight"] = weight("model.embed_tokens")
        out["output_norm.weight"] = model.model.norm.weight.float().numpy()
        if not cfg.tie_word_embeddings:
            out["output.weight"] = weight("lm_head")
        for i in range(cfg.num_hidden_layers):
            out[f"blk.{i}.attn_norm.weight"] = mods[f"model.layers.{i}.input_layernorm"].weight.float().numpy()
            out[f"blk.{i}.ffn_norm.weight"] = mods[f"model.layers.{i}.post_attention_layernorm"].weight.float().numpy()
            for gg, hf in LINEARS.items():
                w = weight(f"model.layers.{i}.{hf}")
                if gg == "attn_q":
                    w = _permute(w, cfg.num_attention_heads)
                elif gg == "attn_k":
                    w = _permute(w, cfg.num_key_value_heads)
                out[f"blk.{i}.{gg}.weight"] = w
    return out


def _read(path: Path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize(
    "bits,quantizer,group,ternary,expect",
    [
        (4, "auto", 32, "tq2_0", "Q4_0"),  # LSQ 4-bit codes -8..7, group 32
        (4, "auto", 64, "tq2_0", "Q4_0"),  # two Q4_0 blocks share one lowbit scale
        (3, "auto", 32, "tq2_0", "Q4_0"),  # 3-bit LSQ levels -4..3 fit Q4_0's -8..7
        (8, "auto", 32, "tq2_0", "Q8_0"),
        (6, "auto", None, "tq2_0", "Q6_K"),  # 6-bit LSQ levels -32..31, one step per row of 256 / 512
        (6, "auto", 256, "tq2_0", "Q6_K"),
        (6, "absmax", None, "tq2_0", "Q6_K"),  # levels -31..31
        (6, "auto", 32, "tq2_0", "Q8_0"),  # a step per 32 or 64: Q6_K's 256-block would span several
        (6, "auto", 64, "tq2_0", "Q8_0"),
        (6, "minmax", 64, "tq2_0", "Q8_0"),  # u - zero in -63..63
        (4, "minmax", None, "tq2_0", "Q6_K"),  # per-row zero points: u - zero in -15..15, not Q4_0's -8..7
        ("ternary", "auto", 256, "tq2_0", "TQ2_0"),  # SEQ ternary
        ("ternary", "auto", None, "tq1_0", "TQ1_0"),  # per-channel, rows of 256 / 512
        ("ternary", "absmean", 0, "tq1_0", "TQ1_0"),  # BitNet absmean, one scale per tensor
        (1, "auto", 256, "tq2_0", "TQ2_0"),  # binary +-alpha = alpha * {-1, +1}
    ],
)
def test_exact_types_round_trip(tmp_path, bits, quantizer, group, ternary, expect):
    folder = make_folder(tmp_path, bits, group, quantizer)
    out = tmp_path / "m.gguf"
    result = export_gguf(folder, out, ternary=ternary)
    fields, tensors = _read(out)
    expected = _lowbit_weights(folder)
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        t = tensors[name]
        kind = "blk" if name.startswith("blk.") and len(t.shape) == 2 else "other"
        if kind == "blk":
            assert t.tensor_type.name == expect, name
        got = dequantize_tensor(t)
        assert got.shape == want.shape, name
        assert np.array_equal(got, want), f"{name}: max diff {np.abs(got - want).max()}"
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert result["quantized_fallback"] == 0 and result["inexact_tensors"] == 0
    assert result["linear_types"] == {expect.lower(): 14}
    assert result["file_bytes"] == out.stat().st_size
    assert result["bits_per_weight"] == pytest.approx(8 * out.stat().st_size / result["params"], abs=1e-3)
    per_type = {"Q4_0": 4.5, "Q6_K": 6.5625, "Q8_0": 8.5, "TQ2_0": 2.0625, "TQ1_0": 1.6875}[expect]
    assert result["bits_per_weight_linear"] == pytest.approx(per_type)


def test_metadata_and_tokenizer(tmp_path):
    folder = make_folder(tmp_path, 4, 32)
    out = tmp_path / "m.gguf"
    export_gguf(folder, out)
    fields, tensors = _read(out)
    tok = tiny_tokenizer()
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2
    assert fields["llama.embedding_length"] == 256
    assert fields["llama.feed_forward_length"] == 512
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 64
    assert fields["llama.context_length"] == 256
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.vocab_size"] == len(tok)
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tok.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tok) and all(tokens[i] == t for t, i in vocab.items())
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.convert_tokens_to_ids("<s>")] == int(gguf.TokenType.CONTROL)
    assert types[vocab["Ġthe"] if "Ġthe" in vocab else len(tok) - 1] == int(gguf.TokenType.NORMAL)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.unknown_token_id"] == tok.unk_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert json.loads(fields["lowbit.quant_config"])["bits"] == 4
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


def test_untied_and_quantized_embeddings(tmp_path):
    folder = make_folder(tmp_path, 4, 32, tied=False, quantize_embeddings=True)
    out = tmp_path / "m.gguf"
    result = export_gguf(folder, out)
    _, tensors = _read(out)
    assert tensors["token_embd.weight"].tensor_type.name == "Q4_0"
    assert tensors["output.weight"].tensor_type.name == "Q4_0"
    expected = _lowbit_weights(folder)
    for name in ("token_embd.weight", "output.weight"):
        assert np.array_equal(dequantize_tensor(tensors[name]), expected[name])
    assert result["inexact_tensors"] == 0


@pytest.mark.parametrize("group,kind", [(None, "Q6_K"), (64, "Q8_0")])
def test_six_bit_embedding_and_head_export_exactly(tmp_path, group, kind):
    """A 6-bit embedding and untied head (what the byte-budget planner may choose) keep their codes."""
    folder = make_folder(tmp_path, 4, 32, tied=False, quantize_embeddings=True,
                         overrides={"embeddings": {"bits": 6, "group_size": group}})
    result = export_gguf(folder, tmp_path / "m.gguf")
    _, tensors = _read(tmp_path / "m.gguf")
    expected = _lowbit_weights(folder)
    for name in ("token_embd.weight", "output.weight"):
        assert tensors[name].tensor_type.name == kind
        assert np.array_equal(dequantize_tensor(tensors[name]), expected[name])
        report = next(r for r in result["tensors"] if r["name"] == name)
        assert report["lowbit"] == f"lsq 6-bit {'per-channel' if group is None else f'g{group}'}"
        assert any(n.startswith("q4_0: integer levels -3") and n.endswith("outside -8..7") for n in report["notes"])
    assert result["linear_types"] == {"q4_0": 14} and result["inexact_tensors"] == 0


def test_six_bit_without_an_exact_type_falls_back_with_the_reason(tmp_path):
    folder = make_folder(tmp_path, 6, 16)  # a step per 16 inputs: every Q6_K / Q8_0 block spans two groups
    result = export_gguf(folder, tmp_path / "m.gguf")
    assert result["linear_types"] == {"f16": 14} and result["quantized_fallback"] == 14
    for r in result["tensors"]:
        if r["lowbit"] is not None:
            assert "q6_k: group size 16 is not a multiple of the 256-value block" in r["reason"]
            assert "q8_0: group size 16 is not a multiple of the 32-value block" in r["reason"]


def test_q8_0_keeps_code_minus_128(tmp_path):
    folder = make_folder(tmp_path, 8, 32, tweak=_shrink_steps)
    out = tmp_path / "m.gguf"
    result = export_gguf(folder, out)
    assert result["linear_types"] == {"q8_0": 14}
    assert result["q8_0_with_code_-128"] == 14 and result["inexact_tensors"] == 0
    _, tensors = _read(out)
    data = np.asarray(tensors["blk.0.ffn_up.weight"].data).reshape(-1, 34)[:, 2:].view(np.int8)
    assert data.min() == -128


@pytest.mark.parametrize("fallback,exact", [("f16", False), ("f32", True), ("q8_0", False)])
def test_fallback_reported(tmp_path, fallback, exact):
    # group 16 splits every 32-block: no exact GGUF type, so every linear falls back
    folder = make_folder(tmp_path, 4, 16)
    out = tmp_path / "m.gguf"
    result = export_gguf(folder, out, fallback=fallback)
    assert result["quantized_fallback"] == 14 and result["quantized_exact"] == 0
    assert result["linear_types"] == {fallback: 14}
    assert any("no exact GGUF type" in w for w in result["warnings"])
    expected = _lowbit_weights(folder)
    _, tensors = _read(out)
    worst = 0.0
    for r in result["tensors"]:
        if r["lowbit"] is None:
            continue
        assert "group size 16 is not a multiple" in r["reason"]
        err = float(np.abs(dequantize_tensor(tensors[r["name"]]).astype(np.float64) - expected[r["name"]]).max())
        assert r["max_abs_error"] == pytest.approx(err, rel=1e-6, abs=0)
        worst = max(worst, err)
    assert (worst == 0.0) == exact
    assert result["max_abs_error"] == pytest.approx(worst)
    bits = {"f16": 16.0, "f32": 32.0, "q8_0": 8.5}[fallback]
    assert result["bits_per_weight_linear"] == pytest.approx(bits)


def test_mixed_rows_fall_back_per_tensor(tmp_path):
    # hidden 256 but intermediate 640: ffn_down rows (640) are not 256-multiples -> Q4_0 (exact), rest TQ2_0
    folder = make_folder(tmp_path, "ternary", None, inter=640)
    result = export_gguf(folder, tmp_path / "m.gguf")
    assert result["linear_types"] == {"tq2_0": 12, "q4_0": 2}
    assert result["inexact_tensors"] == 0
    down = next(r for r in result["tensors"] if r["name"] == "blk.0.ffn_down.weight")
    assert down["type"] == "q4_0" and down["reason"] is None
    assert down["notes"] == ["tq2_0: row length 640 is not a multiple of 256"]


def test_cli_export_json(capsys, tmp_path):
    folder = make_folder(tmp_path, 4, 32)
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    code = main(["export", str(folder), "--format", "gguf", "--out", str(out), "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(stdout)
    assert result["types"]["q4_0"]["tensors"] == 14 and result["file_bytes"] == out.stat().st_size
    assert len(result["tensors"]) == 1 + 1 + 2 * 9


def _one_line_error(capsys, argv, *needles):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    for needle in needles:
        assert needle in lines[0]


def test_bad_inputs(capsys, tmp_path, tiny_model_dir):
    _one_line_error(capsys, ["export", tmp_path / "nope", "--out", tmp_path / "a.gguf"], "is not a folder")
    _one_line_error(capsys, ["export", tiny_model_dir, "--out", tmp_path / "a.gguf"], "not a lowbit quantized folder")
    folder = make_folder(tmp_path, 4, 32)
    _one_line_error(capsys, ["export", folder, "--out", tmp_path / "missing" / "a.gguf"], "does not exist")
    _one_line_error(capsys, ["export", folder, "--out", tmp_path], "is a folder")
    assert not list(tmp_path.glob(".a.gguf.tmp-*"))


def test_non_llama_is_refused(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=2, n_positions=64)).eval()
    quantize_model(model, QuantConfig(bits=4, group_size=32, scale_search="none"))
    save_quantized(model, tok, tmp_path / "gpt2q")
    with pytest.raises(LowbitError, match="only Llama-family"):
        export_gguf(tmp_path / "gpt2q", tmp_path / "g.gguf")
    _one_line_error(capsys, ["export", tmp_path / "gpt2q", "--out", tmp_path / "g.gguf"], "only Llama-family", "gpt2")


# ---------------------------------------------------------------------------------------------
# llama.cpp: the exported file runs and matches lowbit's logits
# ---------------------------------------------------------------------------------------------


def _lowbit_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model, _, _ = load_quantized(folder)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
@pytest.mark.parametrize(
    "bits,group,fallback,ternary,kind,max_kl",
    [
        (4, 16, "f32", "tq2_0", "f32", 1e-6),  # fallback F32: llama.cpp computes in fp32
        (4, 16, "f16", "tq2_0", "f16", 1e-3),
        (8, 32, "f16", "tq2_0", "q8_0", 1e-3),
        (4, 32, "f16", "tq2_0", "q4_0", 5e-3),
        (6, None, "f16", "tq2_0", "q6_k", 1e-3),
        (6, 32, "f16", "tq2_0", "q8_0", 1e-3),
        ("ternary", 256, "f16", "tq2_0", "tq2_0", 5e-3),
        ("ternary", 256, "f16", "tq1_0", "tq1_0", 5e-3),
    ],
)
def test_llamacpp_matches_lowbit(tmp_path, bits, group, fallback, ternary, kind, max_kl):
    from lowbit.peers.llamacpp import llamacpp_logits

    folder = make_folder(tmp_path, bits, group)
    out = tmp_path / "m.gguf"
    result = export_gguf(folder, out, fallback=fallback, ternary=ternary)
    assert result["linear_types"] == {kind: 14}
    ids = tiny_tokenizer()(SAMPLE_TEXT[:400])["input_ids"][:64]
    cmp = compare_logits(_lowbit_logits(folder, ids), llamacpp_logits(out, ids, n_threads=1, extra_bufts=False))
    assert cmp["mean_kl"] < max_kl, cmp
    assert cmp["top1_agreement"] >= 0.95, cmp


def _shrink_steps(model):
    """Halve the 8-bit steps so that codes clip at the LSQ bound -128 (Q8_0's int8 holds it)."""
    from lowbit.quant.surgery import quantized_modules

    for _, m in quantized_modules(model):
        m.quantizer.alpha.data.mul_(0.5)
        m.quantizer.round_scales_()


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_llamacpp_q8_0_with_code_minus_128(tmp_path):
    from lowbit.peers.llamacpp import llamacpp_logits

    folder = make_folder(tmp_path, 8, 32, tweak=_shrink_steps)
    out = tmp_path / "m.gguf"
    result = export_gguf(folder, out)
    assert result["q8_0_with_code_-128"] == 14
    ids = tiny_tokenizer()(SAMPLE_TEXT[:400])["input_ids"][:64]
    cmp = compare_logits(_lowbit_logits(folder, ids), llamacpp_logits(out, ids, n_threads=1, extra_bufts=False))
    assert cmp["mean_kl"] < 1e-3 and cmp["top1_agreement"] >= 0.95, cmp


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_llamacpp_tokenizes_like_lowbit(tmp_path):
    from lowbit.peers.llamacpp import open_llamacpp

    folder = make_folder(tmp_path, 4, 32)
    out = tmp_path / "m.gguf"
    export_gguf(folder, out)
    llm = open_llamacpp(out, n_ctx=64, n_threads=1, logits_all=False, extra_bufts=False)
    text = SAMPLE_TEXT[:300]
    assert llm.tokenize(text.encode(), add_bos=False) == tiny_tokenizer()(text)["input_ids"]
    llm.close()


@pytest.mark.real
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
@pytest.mark.parametrize(
    "name,config,types",
    [
        # 4-bit LSQ g32 RTN: every linear is exact Q4_0
        ("q4g32", {"bits": 4, "group_size": 32, "scale_search": "none"}, {"q4_0": 210}),
        # ternary SEQ per-channel on ffn_down of layers 2-9 (1536 inputs = 6 x 256): exact TQ2_0, the rest
        # fp16. (Ternary RTN of every ffn_down, or of layers 10+, wrecks this model: perplexity > 1000.)
        (
            "tdown",
            {"bits": "ternary", "include": ["model.layers.[2-9].mlp.down_proj"], "scale_search": "mse"},
            {"tq2_0": 8, "f16": 202},
        ),
    ],
)
def test_default_model_in_llamacpp(tmp_path, name, config, types):
    """The default model: exact GGUF types, and llama.cpp's logits agree with lowbit's."""
    from lowbit.api import quantize_to_dir
    from lowbit.peers.llamacpp import llamacpp_logits

    folder = tmp_path / name
    quantize_to_dir("smollm2-135m", folder, QuantConfig(**config), progress=False)
    out = tmp_path / f"{name}.gguf"
    result = export_gguf(folder, out)
    assert result["linear_types"] == types and result["inexact_tensors"] == 0
    _, tok, _ = load_quantized(folder)
    ids = tok(SAMPLE_TEXT)["input_ids"][:256]
    cmp = compare_logits(_lowbit_logits(folder, ids), llamacpp_logits(out, ids, n_threads=2, extra_bufts=False))
    assert cmp["mean_kl"] < 0.01 and cmp["top1_agreement"] > 0.9, cmp


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_llamacpp_with_repacking_as_users_run_it(tmp_path):
    """``extra_bufts=True`` (llama.cpp's default weight repacking; on AMX CPUs its CPU_REPACK buffer
    for the Q4_0 tensors without the AMX one, which crashes) runs the exported Q4_0 file and gives
    the logits of the plain kernels up to summation order."""
    from lowbit.peers.llamacpp import llamacpp_logits, open_llamacpp, repack_mode

    folder = make_folder(tmp_path, 4, 32)
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, fallback="f16")
    ids = tiny_tokenizer()(SAMPLE_TEXT[:400])["input_ids"][:48]
    mode = repack_mode(True)
    assert mode in ("default", "cpu_repack") and repack_mode(False) == "off"
    llm = open_llamacpp(out, n_ctx=64, n_threads=2, extra_bufts=True)
    assert llm.lowbit_repack == mode
    llm.close()
    on = llamacpp_logits(out, ids, n_threads=2, extra_bufts=True)
    off = llamacpp_logits(out, ids, n_threads=2, extra_bufts=False)
    cmp = compare_logits(off, on)
    assert cmp["mean_kl"] < 1e-3 and cmp["top1_agreement"] >= 0.95, cmp
