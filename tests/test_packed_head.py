"""A quantized embedding / output head (``quantize_embeddings``) in the packed runtime at 8, 6 and 4 bits:
the head is one kernel-backed PackedLinear shared with the embedding (6-bit codes repacked in u8 at
load), the embedding dequantizes only the rows looked up, and load_packed and the decode loop match
the fake-quant model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_llama, tiny_tokenizer
from lowbit.errors import LowbitError
from lowbit.ptq.gptq import rtn
from lowbit.quant.packing import LAYOUT_LEVELS, packed_nbytes
from lowbit.quant.surgery import QuantConfig
from lowbit.runtime import kernels
from lowbit.runtime.decoder import Decoder
from lowbit.runtime.packed import PackedEmbedding, load_packed, module_bytes
from lowbit.runtime.packed_linear import PackedLinear, kernel_layout
from lowbit.store.folder import load_quantized, save_quantized

HIDDEN = 128  # groups of 32 and 64 are real groups (several per row)
TABLE = "model.embed_tokens"
# (bits, group, grid) of the embedding / head; the decoder linears stay at 4 bits in groups of 32
SETTINGS = [(8, None, "auto"), (8, 32, "minmax"), (6, None, "auto"), (6, 64, "minmax"), (6, 32, "auto"),
            (4, None, "auto"), (4, 32, "auto"), (4, 64, "minmax")]
IDS = [f"{b}bit-{'ch' if g is None else f'g{g}'}-{q}" for b, g, q in SETTINGS]
# the runtime layout of the table: the kernels read u8 and u4; 6-bit codes (u6 in the file) run as u8
RUN_LAYOUT = {8: "u8", 6: "u8", 4: "u4"}


def _folder(tmp_path, bits, group, grid, tied=True):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden=HIDDEN, tied=tied)
    spec = {"bits": bits, "group_size": group, "quantizer": grid}
    rtn(model, QuantConfig(bits=4, group_size=32, quantize_embeddings=True, overrides={"embeddings": spec}))
    save_quantized(model, tok, tmp_path / "q")
    return tmp_path / "q", tok


def _expected_bytes(path) -> int:
    """The bytes load_packed should hold, from the file: codes in the layout they run in (6-bit
    embedding / head codes in u8), steps as stored, zeros in their smallest exact dtype (one value
    when shared); fp16 matrices as stored, norms in float32, the rotary tables; every tensor once."""
    meta = json.loads((path / "lowbit.json").read_text())
    config = json.loads((path / "config.json").read_text())
    total = 2 * (config["hidden_size"] // config["num_attention_heads"] // 2) * 4  # rotary tables
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for key in keys:
            t = f.get_tensor(key)
            owner, _, leaf = key.rpartition(".")
            info = meta["layers"].get(owner)
            if leaf == "qweight":
                layout = kernel_layout(info["n_levels"])
                if owner in (TABLE, "lm_head") and layout == "u6":
                    layout = "u8"
                total += packed_nbytes(layout, *info["shape"])
                if f"{owner}.zero" not in keys:
                    total += 1 if float(info["grid_zero"]).is_integer() else 2
            elif leaf == "zero":
                total += 1 if bool((t == t.reshape(-1)[0]).all()) else t.numel()
            elif leaf == "step" or t.dim() == 2:
                total += t.numel() * t.element_size()
            else:
                total += t.numel() * 4
    return total


@pytest.mark.parametrize("bits,group,grid", SETTINGS, ids=IDS)
def test_quantized_head_runs_the_kernels_and_matches_fake_quant(tmp_path, bits, group, grid):
    path, tok = _folder(tmp_path, bits, group, grid)
    fake, _, _ = load_quantized(path)
    exact, _, _ = load_packed(path, activations="float")
    fast, _, _ = load_packed(path)
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = fake(ids).logits
        assert torch.allclose(exact(ids).logits, ref, atol=1e-4, rtol=1e-4), (exact(ids).logits - ref).abs().max()
        # int8 activations (the default): the tolerance of tests/test_runtime.py
        assert torch.allclose(fast(ids).logits, ref, atol=2e-2, rtol=1e-2), (fast(ids).logits - ref).abs().max()
    for model, mode in ((exact, "float"), (fast, "int8")):
        head, emb = model.lm_head, model.get_input_embeddings()
        assert isinstance(head, PackedLinear) and isinstance(emb, PackedEmbedding)
        assert emb.table is head  # tied: one packed copy
        assert head.layout == RUN_LAYOUT[bits] and head.activations == mode
        assert head.group_size == group and head.packed.dtype == torch.uint8
        assert not any(t.is_floating_point() and t.numel() >= head.out_features * head.in_features
                       for t in head.buffers())  # no float weight: codes and scales only
        x = torch.randn(1, HIDDEN)
        assert head.kernel_runs() == kernels.available() and head.uses_kernel(x) == kernels.available()
        assert head.uses_int8(x) == (mode == "int8" and kernels.available())
        fake_head = fake.lm_head
        assert torch.equal(head.dequantize(), fake_head.quantizer(fake_head.weight).detach())
    with safe_open(path / "model.safetensors", "pt") as f:
        stored = f.get_tensor(f"{TABLE}.qweight")
        stored_scales = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                            for k in f.keys() if k in (f"{TABLE}.step", f"{TABLE}.zero"))
    # resident codes: the file's at 8 and 4 bits; 6-bit codes take a byte each (4/3 of the file's)
    assert head.packed.numel() == (stored.numel() * 4 // 3 if bits == 6 else stored.numel())
    code_bytes = head.packed.numel()
    assert head.nbytes() - code_bytes <= stored_scales + 1  # scales as stored (+ one shared zero point)
    assert module_bytes(fast) == module_bytes(exact) == _expected_bytes(path)  # the tied table counted once


@pytest.mark.parametrize("bits,group,grid", [(8, 32, "auto"), (6, None, "auto"), (4, 64, "minmax")],
                         ids=["8bit-g32", "6bit-ch", "4bit-g64-minmax"])
def test_decoder_steps_on_a_quantized_head_match_fake_quant(tmp_path, bits, group, grid):
    """Lowbit's decode loop (a prompt, then single C steps) with the quantized head called on its
    kernel: logits of every position match the fake-quant model (float activations tightly)."""
    path, tok = _folder(tmp_path, bits, group, grid)
    fake, _, _ = load_quantized(path)
    ids = torch.randint(0, len(tok), (10,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = fake(input_ids=ids[None]).logits[0, 3:]
    for mode, tol in (("float", (1e-4, 1e-4)), ("int8", (2e-2, 1e-2))):
        packed, _, _ = load_packed(path, activations=mode)
        before = module_bytes(packed)
        decoder = Decoder(packed, max_len=16)
        assert (decoder.c_layers is not None) == kernels.available()
        assert (decoder._head_fn is not packed.lm_head) == kernels.available()  # the bound kernel, not the module
        decoder.reset()
        got = [decoder.forward(ids[:4])] + [decoder.forward(ids[j : j + 1]) for j in range(4, 10)]
        got = torch.stack(got)
        assert torch.allclose(got, ref, atol=tol[0], rtol=tol[1]), (mode, (got - ref).abs().max())
        assert module_bytes(packed) == before  # the decoder copies no weight


@pytest.mark.parametrize("use_kernels", [True, False], ids=["c-decoder", "pytorch"])
@pytest.mark.parametrize("bits,group,grid", [(8, None, "minmax"), (6, 32, "auto"), (4, 64, "auto")],
                         ids=["8bit-ch-minmax", "6bit-g32", "4bit-g64"])
def test_embedding_dequantizes_only_the_rows_looked_up(tmp_path, monkeypatch, bits, group, grid, use_kernels):
    if use_kernels and not kernels.available():
        pytest.skip("lowbit kernels unavailable")
    path, tok = _folder(tmp_path, bits, group, grid)
    fake, _, _ = load_quantized(path)
    packed, _, _ = load_packed(path)
    emb = packed.get_input_embeddings()
    if not use_kernels:
        monkeypatch.setenv("LOWBIT_KERNELS", "0")
    import lowbit.runtime.packed as runtime

    decoded_rows = []
    real_dequantize, real_unpack = kernels.dequantize, runtime.unpack_codes
    monkeypatch.setattr(kernels, "dequantize",
                        lambda w, *a, **k: decoded_rows.append(("c", w.rows)) or real_dequantize(w, *a, **k))
    monkeypatch.setattr(runtime, "unpack_codes",
                        lambda p, *a: decoded_rows.append(("pytorch", p.shape[0])) or real_unpack(p, *a))
    path_taken = "c" if use_kernels else "pytorch"
    ids = torch.tensor([[3, 7, 3], [0, len(tok) - 1, 11]])
    with torch.inference_mode():
        got = emb(ids)
        want = fake.get_input_embeddings()(ids)
    assert torch.equal(got, want)  # exact: step * (code - zero) of the same codes and scales
    assert decoded_rows == [(path_taken, ids.numel())]  # the six rows asked for, not the table's
    with torch.inference_mode():
        assert torch.equal(emb(torch.tensor([5])), fake.get_input_embeddings()(torch.tensor([5])))
    assert decoded_rows == [(path_taken, ids.numel()), (path_taken, 1)]


def test_untied_six_bit_head_and_embedding_are_each_repacked_once(tmp_path):
    path, tok = _folder(tmp_path, 6, 64, "auto", tied=False)
    meta = json.loads((path / "lowbit.json").read_text())
    assert meta["layers"]["lm_head"]["layout"] == meta["layers"][TABLE]["layout"] == "u6"
    fake, _, _ = load_quantized(path)
    packed, _, _ = load_packed(path, activations="float")
    head, table = packed.lm_head, packed.get_input_embeddings().table
    assert head is not table and head.layout == table.layout == "u8"
    assert head.packed.data_ptr() != table.packed.data_ptr()
    assert module_bytes(packed) == _expected_bytes(path)
    ids = torch.randint(0, len(tok), (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.allclose(packed(ids).logits, fake(ids).logits, atol=1e-4, rtol=1e-4)


def test_with_layout_repacks_exactly_and_refuses_a_smaller_layout():
    from conftest import six_bit_weight

    qw, bias = six_bit_weight()
    six = PackedLinear.from_quantized(qw, bias)
    six.activations = "int8"
    eight = six.with_layout("u8")
    assert six.layout == "u6" and eight.layout == "u8" and eight.activations == "int8"
    assert eight.packed.shape == (24, 40) and torch.equal(eight.packed, qw.codes.to(torch.uint8))
    assert eight.step is six.step and eight.zero is six.zero  # scales shared, not copied
    assert torch.equal(eight.dequantize(), qw.dequantize()) and eight.with_layout("u8") is eight
    assert eight.kernel_runs() == kernels.available()
    x = torch.randn(3, 40)
    eight.activations = six.activations = "float"
    assert torch.allclose(eight(x), six(x), atol=1e-5, rtol=1e-5)
    assert LAYOUT_LEVELS["u4"] < 64
    with pytest.raises(LowbitError, match="do not fit layout u4"):
        six.with_layout("u4")
