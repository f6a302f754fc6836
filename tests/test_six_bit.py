"""6-bit weights end to end: parsing, the grids, RTN and GPTQ on a tiny Llama, the folder on disk (u6 codes,
4 in 3 bytes), load_quantized / load_packed (no C kernel for u6: the PyTorch path; a 6-bit embedding / head is repacked in
u8 at load, see tests/test_packed_head.py) and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_llama, tiny_tokenizer
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import evaluate, size_account
from lowbit.ptq.gptq import gptq, rtn
from lowbit.quant.packing import default_layout, pack_codes, row_bytes
from lowbit.quant.quantizers import LSQQuantizer, make_quantizer, parse_bits, parse_override
from lowbit.quant.surgery import QuantConfig, quantized_modules
from lowbit.runtime import kernels
from lowbit.runtime.packed import PackedEmbedding, generate, load_packed
from lowbit.runtime.packed_linear import PackedLinear, kernel_layout
from lowbit.store.folder import load_quantized, save_quantized


def _ids(n, seq, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def test_parse_bits_and_overrides_take_six():
    assert parse_bits("6") == parse_bits(6) == parse_bits(6.0) == 6.0
    with pytest.raises(LowbitError, match=r"choose one of 1, 1\.58 \(or 'ternary'\), 2, 3, 4, 6, 8"):
        parse_bits("5")
    assert parse_override("embeddings=6:64") == ("embeddings", {"bits": 6.0, "group_size": 64})
    cfg = QuantConfig(bits=4, quantize_embeddings=True, overrides={"embeddings": {"bits": "6", "group_size": 64}})
    assert cfg.overrides["embeddings"]["bits"] == 6.0


@pytest.mark.parametrize("name,levels,zero", [("auto", 64, 32.0), ("lsq", 64, 32.0), ("absmax", 63, 31.0)])
def test_six_bit_symmetric_grids(name, levels, zero):
    """LSQ (the ParetoQ choice at 6 bits, like 4 and 8) has codes -32..31; abs-max -31..31; both pack in u6."""
    q = make_quantizer(6, name, 32)
    assert q.n_levels == levels and q.grid_zero == zero and default_layout(q.n_levels) == "u6"
    assert isinstance(make_quantizer(6), LSQQuantizer)
    torch.manual_seed(0)
    w = torch.randn(8, 96)
    q.initialize(w, search="none")
    qw = q.quantize(w)
    signed = qw.codes.int() - int(zero)
    assert signed.min() >= -(levels // 2) and signed.abs().max() == 31  # max|W| of each group sits at +-31
    assert torch.equal(qw.dequantize(), q(w))
    err6 = (q(w) - w).abs().max(dim=1).values
    step = q.quantize(w).step.amax(dim=1)
    assert bool((err6 <= step / 2 + 1e-6).all())  # round to nearest inside the range


def test_six_bit_minmax_is_asymmetric_with_64_levels():
    q = make_quantizer(6, "minmax")
    w = torch.tensor([[0.0, 1.0, 2.0, 63.0]])
    q.initialize(w, search="none")
    qw = q.quantize(w)
    assert q.n_levels == 64 and qw.codes.tolist() == [[0, 1, 2, 63]] and torch.equal(q(w), w)


# --------------------------------------------------------------------------- a tiny Llama at 6 bits


def _quantized(method: str, bits: int, group, model, ids):
    model = copy.deepcopy(model)
    config = QuantConfig(bits=bits, group_size=group)
    if method == "rtn":
        rtn(model, config)
    else:
        gptq(model, config, ids, progress=False)
    return model


@pytest.mark.parametrize("group", [None, 32, 64])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tiny_llama_at_six_bits_is_on_grid_and_closer_than_four(method, group):
    fp = tiny_llama(hidden=128)
    calib, held_out = _ids(8, 32, 128, 1), _ids(6, 32, 128, 7)
    six = _quantized(method, 6, group, fp, calib)
    four = _quantized(method, 4, group, fp, calib)
    layers = quantized_modules(six)
    assert len(layers) == 14
    for name, m in layers:
        qw = m.quantizer.quantize(m.weight)
        assert qw.n_levels == 64 and qw.bits == 6.0 and int(qw.codes.max()) <= 63, name
        assert torch.equal(qw.dequantize(), m.weight.detach()), name  # the weight is the grid value
        assert torch.equal(m.quantizer(m.weight), m.weight.detach()), name
    kl6 = evaluate(six, held_out, reference=fp, progress=False)["kl_to_reference"]
    kl4 = evaluate(four, held_out, reference=fp, progress=False)["kl_to_reference"]
    assert 0 < kl6 < kl4 / 8  # 4x finer steps: about 16x less squared rounding error than 4 bits (16-19x here)


def _expected_layer_bytes(rows: int, cols: int, group) -> int:
    """6 bits per code (4 codes in 3 bytes per row) plus one fp16 step per row and group."""
    groups = 1 if group is None else -(-cols // group)
    return rows * 3 * -(-cols // 4) + rows * groups * 2


@pytest.mark.parametrize("group", [None, 32])
def test_six_bit_folder_round_trips_and_stores_six_bits_per_code(tmp_path, group):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden=64)
    rtn(model, QuantConfig(bits=6, group_size=group, quantize_embeddings=True))
    save_quantized(model, tok, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    expected_linear = 0
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        for name, info in meta["layers"].items():
            if "tied_to" in info:
                continue
            rows, cols = info["shape"]
            assert (info["layout"], info["bits"], info["n_levels"]) == ("u6", 6.0, 64), name
            qweight = f.get_tensor(f"{name}.qweight")
            assert qweight.dtype == torch.uint8 and qweight.shape == (rows, 3 * -(-cols // 4))
            if cols % 4 == 0:
                assert qweight.numel() * 8 == rows * cols * 6  # exactly 6 bits per code
            assert f.get_tensor(f"{name}.step").dtype == torch.float16
            assert f"{name}.zero" not in f.keys()  # symmetric grid: no zero points stored
            expected_linear += _expected_layer_bytes(rows, cols, group)
    assert size_account(model)["linear_bytes"] == expected_linear
    ids = _ids(2, 12, len(tok), 3)
    loaded, _, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        before = model(ids).logits
        assert torch.equal(loaded(ids).logits, before)
        for (name, a), (_, b) in zip(quantized_modules(model), quantized_modules(loaded), strict=True):
            assert torch.equal(a.quantizer(a.weight), b.quantizer(b.weight)), name
        packed, tokenizer, _ = load_packed(tmp_path / "q", activations="float")
        assert isinstance(packed.get_input_embeddings(), PackedEmbedding)
        layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
        fake = dict(quantized_modules(model))
        table = packed.get_input_embeddings().table
        assert table is packed.lm_head and table.layout == "u8"  # the tied head runs u8 codes on the kernels
        assert layers and all(m.layout == "u6" for m in layers.values() if m is not table)
        for name, m in layers.items():
            assert torch.equal(m.dequantize(), fake[name.removesuffix(".table")].weight.detach()), name
            if m is not table:
                assert not m.uses_kernel(torch.zeros(1, m.in_features)) and not m.kernel_runs()
        assert torch.equal(packed(ids).logits, before)
    text = generate(packed, tokenizer, "The quick brown", max_new_tokens=4, stream=False)
    assert text.startswith("The quick brown")


def test_u6_packed_linear_runs_the_pytorch_path():
    """No C kernel reads u6: PackedLinear validates it, refuses nothing, and computes F.linear exactly."""
    from conftest import six_bit_weight

    qw, bias = six_bit_weight()
    layer = PackedLinear.from_quantized(qw, bias)
    assert layer.layout == kernel_layout(64) == "u6" and layer.packed.shape == (24, row_bytes("u6", 40)) == (24, 30)
    assert not kernels.has_kernel("u6")
    x = torch.randn(20, 40)  # above KERNEL_MAX_BATCH too
    assert torch.equal(layer(x), torch.nn.functional.linear(x, qw.dequantize(), bias))
    assert layer.decode_fn() is layer
    with pytest.raises(LowbitError, match="no kernel for layout 'u6'"):
        kernels.weight_struct(pack_codes(qw.codes, "u6"), "u6", 40, 16, qw.step, qw.zero)
    with pytest.raises(LowbitError, match="packed weight must be uint8"):
        PackedLinear(layer.packed[:, :-3], layer.step, layer.zero, 40, 16, "u6", 64, 6, "minmax")


def test_cli_quantizes_at_six_bits_with_a_six_bit_embedding_override(tiny_model_dir, tmp_path, capsys):
    from lowbit.cli.main import main

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_model_dir), "--bits", "6", "--group-size", "32", "--quantize-embeddings"]
    argv += ["--override", "embeddings=6:64", "--out", str(out), "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["quant_config"]["bits"] == 6.0
    assert meta["layers"]["model.embed_tokens"]["group_size"] == 64
    assert {info.get("layout") for info in meta["layers"].values()} <= {"u6", None}
    printed = json.loads(capsys.readouterr().out)
    assert 6.0 < printed["bits_per_weight_linear"] < 6.6  # 6-bit codes + an fp16 step per 32
