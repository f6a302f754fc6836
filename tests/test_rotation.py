"""Rotations folded into the weights (``QuantConfig.rotate``): Hadamard construction, exact function
preservation, refusals, and a rotated quantized model saved, loaded and exported like any other."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit.errors import LowbitError
from lowbit.ptq.methods import GPTQ, RTN
from lowbit.quant.rotation import hadamard, random_rotation, rotate_model_
from lowbit.quant.surgery import QuantConfig
from lowbit.store.folder import load_quantized, save_quantized


def _ids(vocab=128, n=2, seq=24, seed=3):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 44, 64, 576, 640, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [9, 36, 100])
def test_no_hadamard_falls_back_to_random_orthogonal(n):
    assert hadamard(n) is None
    q = random_rotation(n, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_random_rotation_is_seeded_and_orthogonal():
    a = random_rotation(48, torch.Generator().manual_seed(1))
    b = random_rotation(48, torch.Generator().manual_seed(1))
    c = random_rotation(48, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(48, dtype=torch.float64), atol=1e-12)


def _with_norm_scales(model, seed=5):
    """Random (non-unit) RMSNorm scales, so that folding them is exercised."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 0.5 + torch.rand(p.shape, generator=g)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_rotation_preserves_the_function(tied):
    model = _with_norm_scales(tiny_llama(tied=tied))
    rotated = copy.deepcopy(model)
    record = rotate_model_(rotated, seed=0)
    assert record["head"] == ("tied, final-norm mix" if tied else "untied, folded")
    assert (rotated.lm_head.weight is rotated.model.embed_tokens.weight) is tied
    assert rotated.config.tie_word_embeddings is tied
    ids = _ids()
    with torch.no_grad():
        a, b = model(ids).logits, rotated(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert not torch.allclose(model.model.layers[0].mlp.up_proj.weight, rotated.model.layers[0].mlp.up_proj.weight)


def test_rotation_preserves_qwen2_with_biases():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = _with_norm_scales(Qwen2ForCausalLM(cfg).eval())
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.normal_()
    rotated = copy.deepcopy(model)
    rotate_model_(rotated)
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, rotated(ids).logits, atol=1e-4)


def test_rotation_spreads_an_outlier_input():
    model = tiny_llama()
    w = model.model.layers[1].mlp.gate_proj.weight
    w.data[:, 7] *= 40.0  # one residual direction with huge weights (an outlier channel)
    before = (w.abs().amax() / w.pow(2).mean().sqrt()).item()
    rotate_model_(model)
    w = model.model.layers[1].mlp.gate_proj.weight
    after = (w.abs().amax() / w.pow(2).mean().sqrt()).item()
    assert after < before / 2, (before, after)


def test_rotation_refuses_gemma_and_quantized_models():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    with pytest.raises(LowbitError, match="sandwich norms"):
        rotate_model_(Gemma3ForCausalLM(cfg).eval())
    model = tiny_llama()
    RTN().apply(model, QuantConfig(bits=4, group_size=32))
    with pytest.raises(LowbitError, match="before quantization"):
        rotate_model_(model)


def test_rotate_gptq_lowers_error_on_outlier_model_and_round_trips(tmp_path):
    tok = tiny_tokenizer()
    base = _with_norm_scales(tiny_llama(vocab_size=len(tok)))
    for layer in base.model.layers:  # outlier input channels, as real LMs have
        for lin in (layer.self_attn.q_proj, layer.mlp.up_proj, layer.mlp.gate_proj):
            lin.weight.data[:, 3] *= 30.0
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    ids = tok(SAMPLE_TEXT[:2000], return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        ref = torch.log_softmax(base(ids).logits, -1)
    kl = {}
    for rotate in (False, True):
        model = copy.deepcopy(base)
        cfg = QuantConfig(bits=3, group_size=32, rotate=rotate)
        GPTQ(calib=str(text), calib_tokens=512, seq_len=64).apply(model, cfg, tokenizer=tok, progress=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits, -1)
        kl[rotate] = torch.sum(ref.exp() * (ref - logp), -1).mean().item()
        if rotate:
            assert model.lowbit_rotation["kind"] == "randomized-hadamard"
            save_quantized(model, tok, tmp_path / "rot")
            loaded, _, meta = load_quantized(tmp_path / "rot")
            assert meta["quant_config"]["rotate"] is True and loaded.config.tie_word_embeddings is True
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and hasattr(loaded.model.norm, "mix")
            with torch.no_grad():
                assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)
    assert kl[True] < kl[False], kl


def test_rotated_quantize_to_dir_records_the_rotation(tmp_path, tiny_model_dir):
    import json

    from lowbit.api import quantize_to_dir

    record = quantize_to_dir(str(tiny_model_dir), str(tmp_path / "q"), QuantConfig(bits=4, group_size=32, rotate=True),
                             "rtn", progress=False)  # fmt: skip
    meta = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert meta["info"]["rotation"]["seed"] == 0 and record["rotation"]["residual"] == 64


def test_train_refuses_rotate():
    from lowbit.train.config import TrainConfig

    with pytest.raises(LowbitError, match="quantize --rotate first"):
        TrainConfig(model="x", data="wiki-train", out="o", steps=10, quant=QuantConfig(bits=2, rotate=True))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp not installed")
def test_rotated_model_exports_to_llamacpp(tmp_path):
    from lowbit.eval.evaluation import compare_logits
    from lowbit.gguf import export_gguf
    from lowbit.peers.llamacpp import llamacpp_logits

    tok = tiny_tokenizer()
    model = _with_norm_scales(tiny_llama(vocab_size=len(tok)))
    RTN().apply(model, QuantConfig(bits=4, group_size=32, scale_search="none", rotate=True))
    save_quantized(model, tok, tmp_path / "rot")
    result = export_gguf(tmp_path / "rot", tmp_path / "rot.gguf", fallback="f16")
    assert result["linear_types"] == {"q4_0": 14}
    ids = tok(SAMPLE_TEXT[:400])["input_ids"][:64]
    loaded, _, _ = load_quantized(tmp_path / "rot")
    with torch.no_grad():
        ours = loaded(torch.tensor([ids])).logits[0].float().numpy()
    cmp = compare_logits(ours, llamacpp_logits(tmp_path / "rot.gguf", ids, n_threads=1, extra_bufts=False))
    assert cmp["mean_kl"] < 5e-3 and cmp["top1_agreement"] >= 0.95, cmp


@pytest.mark.parametrize("split", [1, 20])
def test_rotated_tied_model_packed_and_decoded_like_the_fake_quant_model(tmp_path, split):
    from lowbit.eval.evaluation import size_account
    from lowbit.runtime.decoder import Decoder
    from lowbit.runtime.packed import load_packed

    tok = tiny_tokenizer()
    base = _with_norm_scales(tiny_llama(vocab_size=len(tok)))
    plain, model = copy.deepcopy(base), copy.deepcopy(base)
    RTN().apply(plain, QuantConfig(bits=4, group_size=32))
    RTN().apply(model, QuantConfig(bits=4, group_size=32, rotate=True))
    hidden = model.config.hidden_size
    assert size_account(model)["total_bytes"] == size_account(plain)["total_bytes"] + hidden * hidden * 2  # + fp16 mix
    save_quantized(model, tok, tmp_path / "rot")
    loaded, _, _ = load_quantized(tmp_path / "rot")
    packed, _, _ = load_packed(tmp_path / "rot", activations="float")  # int8 activations add ~5e-3
    ids = torch.randint(0, len(tok), (24,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = loaded(ids[None]).logits[0]
        got = packed(ids[None]).logits[0]
        decoder = Decoder(packed, max_len=32)
        decoder.reset()
        steps = [decoder.forward(ids[:split])] + [decoder.forward(ids[j : j + 1]) for j in range(split, 24)]
    assert torch.allclose(got, ref, atol=1e-3), (got - ref).abs().max()
    assert torch.allclose(torch.stack(steps), ref[split - 1 :], atol=1e-3)
