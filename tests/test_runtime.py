"""Packed-weight inference: load without float weights, generate, and match the fake-quant model."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lowbit.errors import LowbitError
from lowbit.io import load_quantized, save_quantized
from lowbit.packed_linear import PackedLinear
from lowbit.ptq import rtn
from lowbit.runtime import HalfEmbedding, PackedEmbedding, generate, load_packed, module_bytes, time_decode
from lowbit.surgery import QuantConfig


@pytest.mark.parametrize(
    "cfg",
    [QuantConfig(bits=2, group_size=32), QuantConfig(bits=1.58), QuantConfig(bits=4, quantize_embeddings=True, group_size=32)],
    ids=["2bit-g32", "ternary", "4bit-emb"],
)
def test_packed_model_matches_quantized_model(tmp_path, cfg):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    rtn(model, cfg)
    save_quantized(model, tok, tmp_path / "q")
    fake, _, _ = load_quantized(tmp_path / "q")
    packed, tokenizer, _ = load_packed(tmp_path / "q")
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    emb = packed.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding if cfg.quantize_embeddings else HalfEmbedding)
    ids = torch.randint(0, len(tok), (2, 12))
    # the fp16 head matmul and kernel summation order differ from the fp32 fake-quant path
    assert torch.allclose(packed(ids).logits, fake(ids).logits, atol=2e-2, rtol=1e-2)
    # no float copy of the quantized weights is kept: memory is close to the stored bytes
    stored = sum(1 for _ in packed.parameters())
    assert stored > 0 and module_bytes(packed) < 1.5 * (tmp_path / "q" / "model.safetensors").stat().st_size
    text = generate(packed, tokenizer, "The quick brown", max_new_tokens=5, stream=False)
    assert text.startswith("The quick brown")
    speed = time_decode(packed, ids[:1], new_tokens=3)
    assert speed["decode_tokens_per_s"] > 0 and speed["prefill_tokens_per_s"] > 0


def _saved_quantized(tmp_path, cfg):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    rtn(model, cfg)
    save_quantized(model, tok, tmp_path / "q")
    return tmp_path / "q", tok


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32), QuantConfig(bits=1.58)], ids=["u4", "t5->u2"])
def test_load_packed_buffers_equal_from_quantized(tmp_path, cfg):
    """Layers read straight from the file's packed bytes (no unpack/repack) hold exactly the buffers
    PackedLinear.from_quantized builds from the fake-quant model's QuantizedWeight."""
    path, _ = _saved_quantized(tmp_path, cfg)
    fake, _, _ = load_quantized(path)
    packed, _, _ = load_packed(path, activations="float")
    fake_modules = dict(fake.named_modules())
    n = 0
    for name, layer in packed.named_modules():
        if isinstance(layer, PackedLinear):
            module = fake_modules[name]
            ref = PackedLinear.from_quantized(module.quantizer.quantize(module.weight))
            for buf in ("packed", "step", "zero"):
                a, b = getattr(layer, buf), getattr(ref, buf)
                assert a.dtype == b.dtype and torch.equal(a, b), (name, buf)
            n += 1
    assert n > 0


def test_int8_activations_decode_matches_float(tmp_path):
    """The int8-activation runtime (default) decodes token by token on the int8 kernels and stays
    close to the exact float runtime; a bad activations value is refused."""
    path, tok = _saved_quantized(tmp_path, QuantConfig(bits=4, group_size=32))
    exact, _, _ = load_packed(path, activations="float")
    fast, _, _ = load_packed(path)
    layers = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.activations == "int8" for m in layers)
    x = torch.randn(1, layers[0].in_features)
    assert layers[0].uses_int8(x) == kernels_available()
    ids = torch.randint(0, len(tok), (1, 10))
    with torch.inference_mode():
        a, b = exact(ids).logits, fast(ids).logits
    assert not torch.equal(a, b) or not kernels_available()
    assert torch.allclose(a, b, atol=5e-2, rtol=5e-2)
    with pytest.raises(LowbitError, match="activations"):
        load_packed(path, activations="int4")


def kernels_available() -> bool:
    from lowbit import kernels

    return kernels.available()


def test_half_linear_kernel_matches_torch():
    from lowbit import kernels
    from lowbit.runtime import HalfLinear

    w = torch.randn(300, 72).half()
    bias = torch.randn(300)
    head = HalfLinear(w, bias)
    x = torch.randn(2, 3, 72)
    y = head(x)  # 6 rows: the C kernel where available
    ref = x.double() @ w.double().T + bias.double()
    assert y.shape == (2, 3, 300) and torch.allclose(y.double(), ref, atol=1e-3)
    big = torch.randn(40, 72)  # above KERNEL_MAX_BATCH: F.linear in fp16
    assert torch.allclose(head(big).double(), big.double() @ w.double().T + bias.double(), atol=0.1)
    if kernels.available():
        for isa in ("portable", kernels.isa()):
            out = kernels.linear_f16(x.reshape(6, 72), w, bias, isa=isa)
            assert torch.allclose(out.double(), ref.reshape(6, 300), atol=1e-3)
        with pytest.raises(LowbitError, match="float16"):
            kernels.linear_f16(x.reshape(6, 72), w.float())


def test_measure_resident_counts_the_model(tmp_path, tiny_model_dir):
    """A fresh process's RSS growth covers the packed model's bytes (and not much more)."""
    from lowbit.runtime import measure_resident

    path, _ = _saved_quantized(tmp_path, QuantConfig(bits=4, group_size=32))
    mem = measure_resident("packed", str(path))
    assert mem["model_bytes"] > 0
    assert mem["resident_bytes_after_decode"] >= 0.5 * mem["model_bytes"]
    ref = measure_resident("reference", str(tiny_model_dir))
    assert ref["model_bytes"] > mem["model_bytes"]
    with pytest.raises(LowbitError, match="resident memory"):
        measure_resident("packed", str(tmp_path / "missing"))


def test_ternary_layout_t5_keeps_the_file_bytes(tmp_path):
    """ternary_layout="t5" runs ternary layers from the file's 1.6-bit bytes: same outputs as the
    default u2 layout, fewer bytes in memory."""
    path, tok = _saved_quantized(tmp_path, QuantConfig(bits=1.58))
    u2, _, _ = load_packed(path, activations="float")
    t5, _, _ = load_packed(path, activations="float", ternary_layout="t5")
    layers = [m for m in t5.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.layout == "t5" for m in layers)
    assert module_bytes(t5) < module_bytes(u2)
    ids = torch.randint(0, len(tok), (1, 8))
    with torch.inference_mode():
        assert torch.allclose(t5(ids).logits, u2(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(LowbitError, match="ternary_layout"):
        load_packed(path, ternary_layout="u3")


def test_unquantized_linears_stay_fp16(tmp_path):
    """A partly quantized model: the linears left out keep the file's fp16 (HalfLinear), not fp32."""
    from lowbit.runtime import HalfLinear

    path, tok = _saved_quantized(tmp_path, QuantConfig(bits=2, include=["*.mlp.down_proj"]))
    fake, _, _ = load_quantized(path)
    packed, _, _ = load_packed(path, activations="float")
    attn = packed.model.layers[0].self_attn
    assert isinstance(attn.q_proj, HalfLinear) and attn.q_proj.weight.dtype == torch.float16
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedLinear)
    assert module_bytes(packed) <= 1.1 * (path / "model.safetensors").stat().st_size
    ids = torch.randint(0, len(tok), (1, 10))
    with torch.inference_mode():
        assert torch.allclose(packed(ids).logits, fake(ids).logits, atol=2e-2, rtol=1e-2)
