"""Property tests of every quantizer: level sets, idempotence, exact codes x scales, gradients."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from lowbit.errors import LowbitError
from lowbit.quant.quantizers import (
    AbsMeanTernaryQuantizer,
    LSQQuantizer,
    StretchedElasticQuantizer,
    alpha_for_step,
    make_quantizer,
    parse_bits,
)

# (bits, quantizer) pairs covering every class
CASES = [
    (1, "auto"),
    (1.58, "auto"),
    (2, "auto"),
    (3, "auto"),
    (4, "auto"),
    (6, "auto"),
    (8, "auto"),
    (2, "lsq"),
    (1.58, "absmean"),
    (1, "minmax"),
    (2, "minmax"),
    (3, "minmax"),
    (4, "minmax"),
    (6, "minmax"),
    (8, "minmax"),
    (2, "absmax"),
    (3, "absmax"),
    (4, "absmax"),
    (6, "absmax"),
]


@st.composite
def weights_and_group(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 40))
    group = draw(st.sampled_from([None, 0, *range(1, cols + 1)]))
    w = draw(
        arrays("float32", (rows, cols), elements=st.floats(-4, 4, width=32, allow_nan=False, allow_subnormal=False))
    )
    return torch.from_numpy(w), group


def _build(bits, name, w, group, search):
    q = make_quantizer(bits, name, group)
    q.initialize(w, search=search)
    return q


@settings(max_examples=40, deadline=None)
@given(data=weights_and_group(), case=st.sampled_from(CASES), search=st.sampled_from(["none", "mse"]))
def test_codes_times_scales_reproduce_fake_quant_exactly(data, case, search):
    w, group = data
    q = _build(*case, w, group, search)
    wq = q(w)
    qw = q.quantize(w)
    assert qw.codes.dtype == torch.uint8
    assert int(qw.codes.max()) < qw.n_levels
    assert torch.equal(qw.dequantize(), wq)


@settings(max_examples=40, deadline=None)
@given(data=weights_and_group(), case=st.sampled_from(CASES))
def test_idempotent(data, case):
    w, group = data
    q = _build(*case, w, group, "mse")
    wq = q(w)
    assert torch.equal(q(wq), wq)
    assert torch.equal(q.quantize(wq).codes, q.quantize(w).codes)


@settings(max_examples=30, deadline=None)
@given(data=weights_and_group())
def test_ternary_seq_levels(data):
    w, group = data
    q = _build(1.58, "auto", w, group, "none")
    qw = q.quantize(w)
    signed = qw.codes.int() - 1
    assert set(signed.unique().tolist()) <= {-1, 0, 1}
    # W_q / alpha in {-2/3, 0, 2/3}
    ratio = (q(w) / _broadcast_alpha(q, w)).flatten()
    assert torch.allclose(ratio, (signed.flatten() * 2 / 3).float(), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(data=weights_and_group())
def test_two_bit_seq_levels(data):
    w, group = data
    q = _build(2, "auto", w, group, "none")
    ratio = (q(w) / _broadcast_alpha(q, w)).flatten()
    levels = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    assert torch.all((ratio.unsqueeze(-1) - levels).abs().amin(-1) < 1e-6)


@settings(max_examples=30, deadline=None)
@given(data=weights_and_group(), bits=st.sampled_from([3, 4, 6, 8]))
def test_lsq_integer_range(data, bits):
    w, group = data
    q = _build(bits, "auto", w, group, "none")
    assert isinstance(q, LSQQuantizer)
    signed = q.quantize(w).codes.int() - 2 ** (bits - 1)
    assert signed.min() >= -(2 ** (bits - 1)) and signed.max() <= 2 ** (bits - 1) - 1
    ratio = q(w) / _broadcast_alpha(q, w)
    assert torch.allclose(ratio, torch.round(ratio), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(data=weights_and_group())
def test_binary_is_alpha_sign(data):
    w, group = data
    q = _build(1, "auto", w, group, "none")
    alpha = _broadcast_alpha(q, w)
    expected = torch.where(w >= 0, alpha, -alpha)
    assert torch.allclose(q(w), expected, rtol=1e-6, atol=0)


def test_binary_alpha_is_row_mean_abs():
    w = torch.tensor([[1.0, -3.0, 2.0, -2.0], [0.5, 0.5, -0.5, 0.5]])
    q = make_quantizer(1)
    q.initialize(w, search="none")
    assert torch.allclose(q.alpha.squeeze(-1), torch.tensor([2.0, 0.5]))


def test_bitnet_absmean_is_per_tensor_ternary():
    w = torch.tensor([[1.0, -3.0, 0.1, -2.0], [0.5, 0.5, -0.5, 4.0]])
    q = make_quantizer(1.58, "absmean")
    assert isinstance(q, AbsMeanTernaryQuantizer)
    q.initialize(w, search="none")
    gamma = w.abs().mean()
    expected = torch.round(torch.clamp(w / gamma, -1, 1)) * gamma
    assert torch.allclose(q(w), expected)
    assert q.alpha.numel() == 1


def test_minmax_is_asymmetric_and_exact_at_extremes():
    w = torch.tensor([[0.0, 1.2, 2.0, 3.1, 6.0]])
    q = make_quantizer(2, "minmax")
    q.initialize(w, search="none")
    assert torch.allclose(q(w), torch.tensor([[0.0, 2.0, 2.0, 4.0, 6.0]]))


def test_lsq_gradients_follow_paretoq():
    """STE inside the clip range and zero outside; alpha gets q - w/alpha inside, the bound outside."""
    q = make_quantizer(3)
    w = torch.tensor([[0.3, -0.1, 10.0, -10.0]], requires_grad=True)
    q.initialize(torch.tensor([[1.0, 1.0, 1.0, 1.0]]) * 0.9, search="none")  # alpha = 0.9/3 = 0.3
    with torch.no_grad():
        q.alpha.fill_(0.25)
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    x = w.detach() / 0.25
    inside = torch.round(x[0, :2]) - x[0, :2]
    expected = inside.sum() + 3 + (-4)  # clip bounds qmax=3 and qmin=-4
    assert torch.allclose(q.alpha.grad.sum(), expected, atol=1e-6)


def test_seq_gradient_is_straight_through_inside_clip():
    q = StretchedElasticQuantizer(2)
    w = torch.tensor([[0.2, -0.5, 2.0]], requires_grad=True)
    q.initialize(torch.tensor([[1.0, 1.0, 1.0]]), search="none")
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 0.0]]))


def test_shorter_last_group_matches_separate_quantization():
    torch.manual_seed(0)
    w = torch.randn(3, 576)
    q = make_quantizer(4, group_size=128)
    q.initialize(w, search="none")
    assert q.alpha.shape == (3, 5)
    tail = make_quantizer(4)
    tail.initialize(w[:, 512:], search="none")
    assert torch.equal(q(w)[:, 512:], tail(w[:, 512:]))


def test_mse_search_never_worse_than_plain_init():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.rand(16, 1)
    for bits in (1.58, 2, 3, 4):
        plain, searched = make_quantizer(bits), make_quantizer(bits)
        plain.initialize(w, search="none")
        searched.initialize(w, search="mse")
        assert ((searched(w) - w) ** 2).sum() <= ((plain(w) - w) ** 2).sum()


def test_round_scales_makes_steps_fp16_exact():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    for bits in (1, 1.58, 2, 4):
        q = make_quantizer(bits)
        q.initialize(w)
        q.round_scales_()
        step = q.quantize(w).step
        assert torch.equal(step.half().float(), step)


def test_alpha_for_step_inverts_ternary_step():
    step = (torch.rand(100000) * 3 + 1e-4).half().float()  # fp16-exact steps, as stored
    alpha = alpha_for_step(step, 2.0 / 3.0)
    assert torch.equal(alpha * (2.0 / 3.0), step)


@pytest.mark.parametrize(
    "text,bits", [("1", 1.0), ("ternary", 1.58), ("1.58", 1.58), ("2", 2.0), ("6", 6.0), ("8", 8.0)]
)
def test_parse_bits(text, bits):
    assert parse_bits(text) == bits


@pytest.mark.parametrize("text", ["5", "0", "16", "two", "1.7"])
def test_parse_bits_rejects(text):
    with pytest.raises(LowbitError, match="unsupported bit-width"):
        parse_bits(text)


def test_bad_group_size_is_a_clear_error():
    q = make_quantizer(4, group_size=256)
    with pytest.raises(LowbitError, match="larger than the row length"):
        q.initialize(torch.randn(2, 64))


def test_quantizer_bits_mismatch_errors():
    with pytest.raises(LowbitError):
        make_quantizer(3, "seq")
    with pytest.raises(LowbitError):
        make_quantizer(1.58, "lsq")
    with pytest.raises(LowbitError):
        make_quantizer(4, "nope")
    with pytest.raises(LowbitError, match="SEQ supports 1.58"):
        make_quantizer(6, "seq")
    with pytest.raises(LowbitError, match="binary quantizer is 1-bit"):
        make_quantizer(6, "binary")


def _broadcast_alpha(q, w):
    """alpha expanded to w's shape (per row / group / tensor)."""
    from lowbit.quant.quantizers import group_view, ungroup

    wg, _, _ = group_view(w, q.group_size)
    return ungroup(q.alpha.detach().unsqueeze(-1).expand_as(wg), w.shape)
