"""The tokens-to-target extrapolation of ``benchmarks/bench_blockwise.py`` on curves of known law."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_blockwise import extrapolate  # noqa: E402

TOKENS = [20480 * i for i in range(1, 11)]


def _curve(law) -> list[dict]:
    return [{"step": 0, "tokens": 0, "eval_kl": law(1)}] + [{"tokens": t, "eval_kl": law(t)} for t in TOKENS]


def test_pure_power_law_is_recovered_and_solved_for_the_target():
    fit = extrapolate(_curve(lambda t: 3.0 * t**-0.05), target=2.0)
    assert fit["b"] == pytest.approx(0.05, rel=1e-6)
    assert fit["tokens_to_target"] == pytest.approx((3.0 / 2.0) ** (1 / 0.05), rel=1e-4)
    assert fit["floor"]["c"] < 0.05 * 2.0  # no floor in the data: the grid search stays near zero


def test_floor_above_the_target_says_unreachable():
    fit = extrapolate(_curve(lambda t: 2.2 + 5.0 * t**-0.3), target=2.0)
    assert fit["floor"]["c"] == pytest.approx(2.2, abs=0.05)
    assert "tokens_to_target" not in fit["floor"] and "would not reach 2.0" in fit["text"]
    assert fit["tokens_to_target"] > TOKENS[-1]  # the floorless law still gives a (too hopeful) count


def test_scale_puts_the_curve_on_the_target_measure():
    curve = _curve(lambda t: 4.0 * t**-0.05)
    plain, scaled = extrapolate(curve, target=2.0), extrapolate(curve, target=2.0, scale=0.5)
    assert scaled["a"] == pytest.approx(plain["a"] * 0.5, rel=1e-6)
    assert scaled["tokens_to_target"] < plain["tokens_to_target"]


def test_flat_or_short_curves_give_no_count():
    flat = extrapolate(_curve(lambda t: 1.0 + 1e-3 * (t % 3)), target=0.35)
    assert "did not fall" in flat["text"] and "tokens_to_target" not in flat
    assert extrapolate([{"tokens": 10, "eval_kl": 1.0}], target=0.35) is None
    assert extrapolate(_curve(lambda t: t**-0.1), target=None) is None
