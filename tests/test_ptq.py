"""Model surgery, RTN and GPTQ, the saved folder format and the size account, on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import evaluate, size_account
from lowbit.ptq.gptq import gptq, gptq_quantize_weight, rtn
from lowbit.quant.quantizers import make_quantizer
from lowbit.quant.surgery import QuantConfig, QuantizedEmbedding, QuantizedLinear, quantize_model, quantized_modules
from lowbit.store.folder import load_quantized, save_quantized


def _ids(n=8, seq=32, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def test_surgery_swaps_decoder_linears_and_keeps_head(tiny_model):
    quantize_model(tiny_model, QuantConfig(bits=2))
    names = [n for n, _ in quantized_modules(tiny_model)]
    assert len(names) == 2 * 7  # q,k,v,o,gate,up,down per layer
    assert isinstance(tiny_model.lm_head, nn.Linear) and not isinstance(tiny_model.lm_head, QuantizedLinear)
    assert isinstance(tiny_model.model.embed_tokens, nn.Embedding)


def test_patterns_and_mixed_precision_overrides(tiny_model):
    cfg = QuantConfig(bits=2, exclude=["*.self_attn.k_proj"], overrides={"model.layers.0.*": {"bits": 8, "group_size": 16}})
    quantize_model(tiny_model, cfg)
    mods = dict(quantized_modules(tiny_model))
    assert "model.layers.0.self_attn.k_proj" not in mods
    assert mods["model.layers.0.mlp.up_proj"].quantizer.bits == 8
    assert mods["model.layers.0.mlp.up_proj"].quantizer.group_size == 16
    assert mods["model.layers.1.mlp.up_proj"].quantizer.bits == 2


def test_quantize_tied_embeddings_shares_one_quantizer(tiny_model):
    quantize_model(tiny_model, QuantConfig(bits=4, quantize_embeddings=True, group_size=32))
    emb, head = tiny_model.model.embed_tokens, tiny_model.lm_head
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    assert emb.quantizer is head.quantizer and emb.weight is head.weight


def test_no_matching_layer_is_an_error(tiny_model):
    with pytest.raises(LowbitError, match="nothing to quantize"):
        quantize_model(tiny_model, QuantConfig(bits=4, include=["nothing.*"]))


def test_gpt2_conv1d_layers_are_quantized():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    ids = _ids(4, 16)
    fp = copy.deepcopy(model)
    rtn(model, QuantConfig(bits=8))
    assert len(quantized_modules(model)) == 2 * 4
    out, ref = model(ids).logits, fp(ids).logits
    assert torch.allclose(out, ref, atol=0.05)
    gptq(copy.deepcopy(fp), QuantConfig(bits=4), ids, progress=False)


@pytest.mark.parametrize("bits,group", [(4, None), (3, 16), (2, None), (1.58, 32), (1, None)])
def test_gptq_has_lower_layer_error_than_rtn(bits, group):
    """On correlated inputs GPTQ's output error ||(W - Q) X|| is below round-to-nearest's."""
    torch.manual_seed(0)
    x = torch.randn(2048, 64) @ torch.randn(64, 64)  # correlated features
    w = torch.randn(48, 64)
    H = 2 * x.t() @ x / len(x)
    q_rtn = make_quantizer(bits, group_size=group)
    q_rtn.initialize(w)
    err_rtn = ((q_rtn(w) - w) @ x.t()).pow(2).sum()
    q, alpha, zero = gptq_quantize_weight(w, H, make_quantizer(bits, group_size=group))
    err_gptq = ((q - w) @ x.t()).pow(2).sum()
    assert err_gptq < err_rtn
    # the result lies on its own grid: installing the scales reproduces it exactly
    quant = make_quantizer(bits, group_size=group)
    quant.set_scales(alpha, zero)
    assert torch.allclose(quant(q), q, atol=1e-6)


def test_gptq_act_order_runs_and_stays_on_grid():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.linspace(0.1, 3, 64)
    w = torch.randn(16, 64)
    q, alpha, zero = gptq_quantize_weight(w, 2 * x.t() @ x / 512, make_quantizer(3, group_size=16), act_order=True)
    quant = make_quantizer(3, group_size=16)
    quant.set_scales(alpha, zero)
    assert torch.allclose(quant(q), q, atol=1e-6)


def test_gptq_beats_rtn_end_to_end(tiny_model):
    ids = _ids(16, 32)
    rtn_model, gptq_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    rtn(rtn_model, QuantConfig(bits=2))
    gptq(gptq_model, QuantConfig(bits=2), ids, progress=False)
    held_out = _ids(8, 32, seed=7)
    kl_rtn = evaluate(rtn_model, held_out, reference=tiny_model, progress=False)["kl_to_reference"]
    kl_gptq = evaluate(gptq_model, held_out, reference=tiny_model, progress=False)["kl_to_reference"]
    assert kl_gptq < kl_rtn


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(bits=2),
        QuantConfig(bits=1.58, group_size=48),
        QuantConfig(bits=3, group_size=32, quantizer="minmax"),
        QuantConfig(bits=1),
        QuantConfig(bits=4, quantize_embeddings=True, group_size=32),
        QuantConfig(bits=1.58, quantizer="absmean"),
    ],
    ids=lambda c: f"{c.bits}-{c.quantizer}-{c.group_size}-{c.quantize_embeddings}",
)
def test_save_load_roundtrip_is_exact(tiny_model, tmp_path, cfg):
    ids = _ids(2, 16)
    rtn(tiny_model, cfg)
    before = tiny_model(ids).logits
    save_quantized(tiny_model, None, tmp_path / "q", info={"base_model": "x"})
    loaded, _, meta = load_quantized(tmp_path / "q")
    assert torch.equal(loaded(ids).logits, before)
    assert meta["info"]["base_model"] == "x"
    assert size_account(loaded) == size_account(tiny_model)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_size_account_matches_bytes_written(tiny_model, tmp_path):
    rtn(tiny_model, QuantConfig(bits=2, group_size=32))
    acc = size_account(tiny_model)
    save_quantized(tiny_model, None, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    header = meta["weights_bytes"] - acc["total_bytes"]
    assert 0 < header < 20_000  # the file is the tensors plus the safetensors JSON header
    # 2-bit codes, fp16 step per 32 weights: 2.5 bits per linear weight
    assert acc["bits_per_weight_linear"] == pytest.approx(2.5)
    fp = size_account(tiny_llama())
    assert fp["bits_per_weight"] == 32.0 and fp["total_bytes"] > 4 * acc["total_bytes"]


def test_corrupted_or_truncated_file_is_refused(tiny_model, tmp_path):
    rtn(tiny_model, QuantConfig(bits=2))
    save_quantized(tiny_model, None, tmp_path / "q")
    weights = tmp_path / "q" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="SHA-256"):
        load_quantized(tmp_path / "q")
    weights.write_bytes(bytes(data[:-100]))
    with pytest.raises(LowbitError, match="truncated"):
        load_quantized(tmp_path / "q")


def test_failed_save_keeps_previous_output(tiny_model, tmp_path, monkeypatch):
    rtn(tiny_model, QuantConfig(bits=2))
    out = tmp_path / "q"
    save_quantized(tiny_model, None, out)
    first = (out / "lowbit.json").read_text()
    import lowbit.store.folder as lio

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lio.SafetensorsWriter, "finish", boom)  # the weights file fails mid-write
    with pytest.raises(OSError):
        save_quantized(tiny_model, None, out, overwrite=True)
    assert (out / "lowbit.json").read_text() == first
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_evaluate_reports_kl_zero_against_itself(tiny_model):
    r = evaluate(tiny_model, _ids(2, 16), reference=tiny_model, progress=False)
    assert r["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert r["top1_agreement"] == 1.0
    assert r["tokens"] == 2 * 15


def _arch_model(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()
    if arch == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=8)).eval()
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    return tiny_llama(hidden=32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_every_family_quantizes_saves_and_reloads(arch, tmp_path):
    fp = _arch_model(arch)
    model = copy.deepcopy(fp)
    gptq(model, QuantConfig(bits=3, group_size=16), _ids(4, 16), progress=False)
    ids = _ids(2, 16, seed=3)
    before = model(ids).logits
    save_quantized(model, None, tmp_path / arch)
    loaded, _, _ = load_quantized(tmp_path / arch)
    assert torch.equal(loaded(ids).logits, before)
    assert evaluate(loaded, ids, reference=fp, progress=False)["top1_agreement"] > 0.3
