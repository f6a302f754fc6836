"""Evaluation against a reference without a full-vocabulary cache: the reference runs alongside batch by
batch, ``peak_memory_bytes`` and ``reference_mode`` are reported, and a top-k reference cache keeps
KL within its stated bound of the exact value."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit.api import eval_model
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.eval.data import tokenize_windows
from lowbit.eval.evaluation import cache_reference, evaluate
from lowbit.memory import peak_resident_bytes as peak_memory_bytes
from lowbit.ptq.gptq import rtn
from lowbit.quant.surgery import QuantConfig


@pytest.fixture(scope="module")
def pair():
    """A tiny reference, its 2-bit copy, and eval windows."""
    tokenizer = tiny_tokenizer()
    reference = tiny_llama(vocab_size=len(tokenizer), hidden=64)
    model = rtn(copy.deepcopy(reference), QuantConfig(bits=2, group_size=16))
    windows = tokenize_windows(tokenizer, SAMPLE_TEXT, 32, max_tokens=32 * 12, bos=True)
    return reference, model, windows


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status")


def test_peak_memory_is_the_process_high_water_mark():
    before = _hwm()
    peak = peak_memory_bytes()
    after = _hwm()
    assert 0.95 * before <= peak <= 1.05 * after  # ru_maxrss and VmHWM account pages slightly apart
    assert peak > 10 * 2**20  # bytes, not KiB: torch alone takes more than 10 MiB


def test_alongside_reference_equals_the_full_cache(pair):
    reference, model, windows = pair
    alongside = evaluate(model, windows, reference=reference, batch_size=5, progress=False)
    cached = evaluate(model, windows, reference=cache_reference(reference, windows, 5, progress=False), progress=False)
    assert alongside["reference_mode"] == "model-alongside" and cached["reference_mode"] == "cached-full"
    assert alongside["kl_to_reference"] > 1e-3
    assert alongside["kl_to_reference"] == pytest.approx(cached["kl_to_reference"], rel=1e-6)
    assert alongside["top1_agreement"] == cached["top1_agreement"]
    assert "kl_error_bound" not in alongside
    assert evaluate(model, windows, progress=False)["reference_mode"] is None


def test_top_k_cache_kl_lies_within_its_bound_and_tightens_with_k(pair):
    reference, model, windows = pair
    full = cache_reference(reference, windows, 4, progress=False)
    exact = evaluate(model, windows, reference=full, progress=False)
    errors = []
    for k in (1, 4, 16, 64):
        top = cache_reference(reference, windows, 4, progress=False, top_k=k)
        positions = windows.shape[0] * (windows.shape[1] - 1)
        assert full.nbytes == positions * reference.config.vocab_size * 4
        assert top.nbytes == positions * (8 * k + 4) and top.mode == f"cached-top{k}"
        approx = evaluate(model, windows, reference=top, progress=False)
        err = exact["kl_to_reference"] - approx["kl_to_reference"]
        assert -1e-6 <= err <= approx["kl_error_bound"] + 1e-6  # KL_k is a lower bound; the gap is bounded
        assert approx["top1_agreement"] == exact["top1_agreement"]
        assert approx["perplexity"] == exact["perplexity"]
        errors.append(err)
    # nested top-k sets refine the coarse-graining, so KL_k can only grow toward the exact KL
    assert all(a >= b - 1e-7 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.5 * errors[0]


def test_top_k_at_least_the_vocabulary_is_exact(pair):
    reference, model, windows = pair
    vocab = reference.config.vocab_size
    exact = evaluate(model, windows, reference=cache_reference(reference, windows, 4, progress=False), progress=False)
    whole = cache_reference(reference, windows, 4, progress=False, top_k=vocab + 10)
    approx = evaluate(model, windows, reference=whole, progress=False)
    assert approx["kl_to_reference"] == pytest.approx(exact["kl_to_reference"], rel=1e-5)
    assert approx["kl_error_bound"] == 0.0
    with pytest.raises(LowbitError, match="top_k"):
        cache_reference(reference, windows, 4, progress=False, top_k=0)
    with pytest.raises(ValueError, match="top-k"):
        whole.log_probs(0, windows[:4])


def test_eval_model_and_cli_report_mode_and_peak(pair, tiny_model_dir, sample_text_file, capsys):
    reference, model, _ = pair
    tokenizer = tiny_tokenizer()
    result = eval_model(model, tokenizer, data=str(sample_text_file), reference=reference, seq_len=32,
                        max_tokens=256, batch_size=2, progress=False)
    assert result["reference_mode"] == "model-alongside"
    assert result["peak_memory_bytes"] >= sum(p.numel() * p.element_size() for p in model.parameters())
    code = main(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir),
                 "--data", str(sample_text_file), "--seq-len", "32", "--max-tokens", "256", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reference_mode"] == "model-alongside" and out["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert isinstance(out["peak_memory_bytes"], int) and out["peak_memory_bytes"] > 0
