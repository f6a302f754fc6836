"""Packed-weight inference: load without float weights, generate, and match the fake-quant model."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lowbit.errors import LowbitError
from lowbit.ptq.gptq import rtn
from lowbit.quant.packing import packed_nbytes
from lowbit.quant.surgery import QuantConfig, quantized_modules
from lowbit.runtime.packed import HalfEmbedding, PackedEmbedding, generate, load_packed, module_bytes, time_decode
from lowbit.runtime.packed_linear import PackedLinear, kernel_layout
from lowbit.store.folder import load_quantized, save_quantized


def _runtime_bytes(path) -> int:
    """The bytes load_packed should hold, computed from the file: each quantized layer's codes in
    its kernel layout, its steps as stored (fp16), its zero point(s) in their smallest exact dtype
    (one value when shared); fp16 matrices as stored; norms in float32; plus the rotary table."""
    import json

    from safetensors import safe_open

    meta = json.loads((path / "lowbit.json").read_text())
    config = json.loads((path / "config.json").read_text())
    rotary = config["hidden_size"] // config["num_attention_heads"] // 2
    total = 2 * rotary * 4  # the rotary tables inv_freq and original_inv_freq, float32
    with safe_open(path / "model.safetensors", "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            owner, _, leaf = key.rpartition(".")
            info = meta["layers"].get(owner)
            if leaf == "qweight":
                total += packed_nbytes(kernel_layout(info["n_levels"]), *info["shape"])
                if f"{owner}.zero" not in f.keys():  # symmetric: one shared zero point
                    total += 1 if float(info["grid_zero"]).is_integer() else 2
            elif leaf == "zero":
                total += 1 if bool((t == t.reshape(-1)[0]).all()) else t.numel()
            elif leaf == "step" or t.dim() == 2:
                total += t.numel() * t.element_size()
            else:  # norms and biases run in float32
                total += t.numel() * 4
    return total


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
    # int8 activations (load_packed's default: each input rounded per 32 features) dominate the gap to the
    # fp32 fake-quant path (max ~4.5e-3 here); the fp16 head and kernel summation order add ~5e-4
    assert torch.allclose(packed(ids).logits, fake(ids).logits, atol=2e-2, rtol=1e-2)
    # no float copy of the quantized weights is kept: exactly the stored codes and scales
    assert module_bytes(packed) == _runtime_bytes(tmp_path / "q")
    text = generate(packed, tokenizer, "The quick brown", max_new_tokens=5, stream=False)
    assert text.startswith("The quick brown")


def test_time_decode_runs_prefill_then_single_tokens(tmp_path):
    """Per repeat: one forward over the whole prompt, then ``new_tokens`` one-token steps."""
    path, _ = _saved_quantized(tmp_path, QuantConfig(bits=4, group_size=32))
    packed, _, _ = load_packed(path)
    calls = []
    packed.register_forward_pre_hook(lambda m, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
                                     with_kwargs=True)
    speed = time_decode(packed, torch.arange(3, 15).reshape(1, 12), new_tokens=3, repeats=2)
    assert calls == 2 * [(1, 12), (1, 1), (1, 1), (1, 1)]
    assert set(speed) == {"prefill_tokens_per_s", "decode_tokens_per_s"}


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
    expected = len([name for name, _ in quantized_modules(fake)])
    for name, layer in packed.named_modules():
        if isinstance(layer, PackedLinear):
            module = fake_modules[name]
            ref = PackedLinear.from_quantized(module.quantizer.quantize(module.weight))
            for buf in ("packed", "step", "zero"):
                a, b = getattr(layer, buf), getattr(ref, buf)
                assert a.dtype == b.dtype and torch.equal(a, b), (name, buf)
            n += 1
    assert n == expected == 14  # 7 linears in each of the 2 blocks


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
    from lowbit.runtime import kernels

    return kernels.available()


def test_half_linear_kernel_matches_torch():
    from lowbit.runtime import kernels
    from lowbit.runtime.packed import HalfLinear

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
    """A fresh process's RSS growth covers the packed model's bytes and not much more: at most the
    stored bytes + 8 MiB after loading (the weights file is mapped: its pages come in as they are
    read) and, once decoding has read every weight, at least the stored bytes and at most + 16 MiB.
    The model (hidden 512) is big enough that a float copy of its weights (24 MB in fp32, 12 MB in
    fp16) would break the bounds."""
    from lowbit.eval.models import load_model
    from lowbit.runtime.resident import measure_resident

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden=512)
    rtn(model, QuantConfig(bits=4, group_size=32))
    path = save_quantized(model, tok, tmp_path / "q")
    mem = measure_resident("packed", str(path))
    assert mem["model_bytes"] == module_bytes(load_packed(path)[0]) == _runtime_bytes(path)
    stored = (path / "model.safetensors").stat().st_size
    assert mem["resident_bytes"] <= stored + 8 * 2**20
    assert stored <= mem["resident_bytes_after_decode"] <= stored + 16 * 2**20
    ref = measure_resident("reference", str(tiny_model_dir))
    reference, _ = load_model(str(tiny_model_dir))
    assert ref["model_bytes"] == module_bytes(reference) == 4 * sum(p.numel() for p in reference.parameters()) + 2 * 4 * 8  # + rotary tables
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
    from lowbit.runtime.packed import HalfLinear

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


def test_ternary_storage_u2_is_read_in_place(tmp_path):
    """``ternary_storage="u2"`` stores ternary codes at 2 bits, which the runtime reads without
    repacking (the packed buffer is the file's bytes); same logits as the default 1.6-bit t5 folder,
    whose codes the runtime unpacks to u2. The size account follows what is stored."""
    import json

    from lowbit.eval.evaluation import size_account

    tok = tiny_tokenizer()
    out = {}
    for storage in ("t5", "u2"):
        model = tiny_llama(vocab_size=len(tok))
        rtn(model, QuantConfig(bits=1.58, ternary_storage=storage))
        acc = size_account(model)
        save_quantized(model, tok, tmp_path / storage)
        meta = json.loads((tmp_path / storage / "lowbit.json").read_text())
        assert {v["layout"] for v in meta["layers"].values() if "layout" in v} == {storage}
        packed, _, _ = load_packed(tmp_path / storage)
        layer = packed.model.layers[0].mlp.down_proj
        assert layer.layout == "u2"
        ids = torch.arange(12)[None] % len(tok)
        with torch.inference_mode():
            out[storage] = (packed(input_ids=ids).logits, acc["linear_bytes"], module_bytes(packed))
    assert torch.equal(out["t5"][0], out["u2"][0])
    assert out["u2"][1] > out["t5"][1]  # stored: 2 bits per code instead of 1.6
    assert out["u2"][2] == out["t5"][2]  # in memory: u2 either way
    with pytest.raises(LowbitError, match="ternary_storage"):
        QuantConfig(bits=1.58, ternary_storage="u3")


def test_drop_pages_releases_mapped_bytes_and_keeps_them_readable(tmp_path):
    from safetensors.torch import save_file

    from lowbit.store.stfile import MappedSafetensors, drop_pages

    data = torch.arange(256 * 1024, dtype=torch.int32)
    save_file({"a": data, "b": torch.ones(3)}, tmp_path / "w.safetensors")
    t = MappedSafetensors(tmp_path / "w.safetensors").get("a")
    assert int(t.sum()) == int(data.sum())  # every page touched
    assert drop_pages(t) >= t.numel() * 4 - 2 * 4096  # whole pages inside the tensor
    assert torch.equal(t, data)  # read again from the file
