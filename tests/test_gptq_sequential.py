"""GPTQ's true-sequential order and calibration sampling (lowbit.ptq.gptq / lowbit.ptq.methods)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lowbit.eval.evaluation import evaluate
from lowbit.ptq.blocks import block_hessians, capture_block_inputs, find_decoder_layers, linear_stages
from lowbit.ptq.gptq import gptq
from lowbit.ptq.methods import calibration_windows
from lowbit.quant.surgery import QuantConfig, is_linear


def _ids(n, length, seed=0, vocab=128):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_stages_follow_the_llama_block():
    model = tiny_llama()
    block = find_decoder_layers(model)[0]
    names = {m: n for n, m in block.named_modules()}
    linears = {names[m]: m for m in block.modules() if is_linear(m)}
    first = capture_block_inputs(model, find_decoder_layers(model), [_ids(2, 16)])[0]
    stages = linear_stages(block, linears, first)
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_sequential_changes_later_stages_only_and_is_not_worse():
    model = tiny_llama()
    ids = _ids(16, 32)
    plain, seq = copy.deepcopy(model), copy.deepcopy(model)
    gptq(plain, QuantConfig(bits=3, group_size=32), ids, progress=False)
    gptq(seq, QuantConfig(bits=3, group_size=32), ids, progress=False, sequential=True)
    p0, s0 = plain.model.layers[0], seq.model.layers[0]
    # the first stage sees the same inputs either way; o_proj reads the quantized attention
    assert torch.equal(p0.self_attn.q_proj.weight, s0.self_attn.q_proj.weight)
    assert not torch.equal(p0.self_attn.o_proj.weight, s0.self_attn.o_proj.weight)
    held_out = _ids(8, 32, seed=7)
    kl = [evaluate(m, held_out, reference=model, progress=False)["kl_to_reference"] for m in (plain, seq)]
    assert kl[1] < 1.5 * kl[0]  # not a quality claim (tiny random model), a sanity bound


def test_random_calibration_windows_are_seeded_and_drawn_from_the_whole_text(tmp_path):
    tok = tiny_tokenizer()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} token{i % 13}" for i in range(4000)))
    first = calibration_windows(tok, str(text), 64, 16)
    a = calibration_windows(tok, str(text), 64, 16, sample="random", seed=1)
    b = calibration_windows(tok, str(text), 64, 16, sample="random", seed=1)
    c = calibration_windows(tok, str(text), 64, 16, sample="random", seed=2)
    assert a.shape == first.shape == (4, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(Exception, match="fewer than"):
        calibration_windows(tok, str(text), 10**7, 16, sample="random")


def test_linears_reading_one_input_share_one_hessian():
    """q/k/v (and gate/up) read the same tensor: one Hessian each group, equal to 2 X^T X / n of the
    input each linear really saw (captured here independently), and separate ones elsewhere."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=100, hidden=64, layers=1).eval()
    layers = find_decoder_layers(model)
    store = capture_block_inputs(model, layers, list(torch.randint(0, 100, (4, 16)).split(2)))
    linears = {n: m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    seen = {n: [] for n in linears}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in linears.items()]  # fmt: skip
    with torch.no_grad():
        hessians = block_hessians(layers[0], linears, store)
    for h in handles:
        h.remove()
    assert hessians["self_attn.q_proj"] is hessians["self_attn.k_proj"] is hessians["self_attn.v_proj"]
    assert hessians["mlp.gate_proj"] is hessians["mlp.up_proj"]
    assert len({id(h) for h in hessians.values()}) == 4  # qkv, o, gate/up, down
    for name, xs in seen.items():
        x = torch.cat(xs).double()
        expected = (2.0 / x.shape[0]) * (x.t() @ x)
        torch.testing.assert_close(hessians[name].double(), expected, rtol=1e-5, atol=1e-6)
