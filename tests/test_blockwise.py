"""Block-AP (block-wise distillation) on a tiny random Llama: lower block MSE and KL than its start, bit-exact
resume after a kill, pre-quantized mixed-precision start points kept, the saved folder equal to memory."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_llama, tiny_tokenizer
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import evaluate
from lowbit.ptq.gptq import gptq, rtn
from lowbit.ptq.methods import calibration_windows, make_method, method_class
from lowbit.quant.surgery import QuantConfig, QuantizedLinear, quantized_modules
from lowbit.store.folder import load_quantized, save_quantized
from lowbit.train.blockap import BlockAP

TESTS = Path(__file__).parent
CONFIG = QuantConfig(bits=2, group_size=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tokenizer, a calibration text of random tokens, the full-precision model and random eval tokens."""
    tok = tiny_tokenizer()
    ids = torch.randint(3, len(tok), (6000,), generator=torch.Generator().manual_seed(3))
    calib = tmp_path_factory.mktemp("blockap") / "calib.txt"
    calib.write_text(tok.decode(ids.tolist()))
    evals = torch.randint(3, len(tok), (16, 32), generator=torch.Generator().manual_seed(5))
    return tok, str(calib), tiny_llama(vocab_size=len(tok)), evals


def _method(calib, **kw):
    settings = dict(calib=calib, calib_tokens=2048, seq_len=32, epochs=2, batch_size=4)
    return BlockAP(**{**settings, **kw})


def _kl(model, fp, evals):
    return evaluate(model, evals, reference=fp, progress=False)["kl_to_reference"]


@pytest.mark.parametrize("init", ["gptq", "rtn"])
def test_blockap_lowers_every_block_mse_and_the_kl_of_its_start(setup, init, tmp_path):
    tok, calib, fp, evals = setup
    method = _method(calib, init=init, epochs=4)
    start = copy.deepcopy(fp)
    windows = calibration_windows(tok, calib, method.calib_tokens, method.seq_len, method.sample, method.seed)
    gptq(start, CONFIG, windows, act_order=True, progress=False) if init == "gptq" else rtn(start, CONFIG)
    model = copy.deepcopy(fp)
    report = method.apply(model, CONFIG, tok, progress=False)
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    for block in report["blocks"]:
        assert block["mse_final"] < block["mse_initial"] and not block["reverted"], block
    assert report["tokens"] == 2048 and report["start"] == init and report["streams"] == "RAM"
    assert _kl(model, fp, evals) < _kl(start, fp, evals)
    for _, module in quantized_modules(model):  # snapped: the fake-quant is a no-op, as after loading
        assert torch.equal(module.quantizer(module.weight), module.weight)
    save_quantized(model, tok, tmp_path / "q", info={"report": report})
    loaded = load_quantized(tmp_path / "q")[0]
    with torch.no_grad():
        assert torch.equal(loaded(evals).logits, model(evals).logits)


class _Killed(Exception):
    pass


def _run_killed(method, model, tok, kill_at, monkeypatch, **kwargs):
    """Run ``method`` on a copy of ``model`` until its ``kill_at``-th optimizer step raises (a kill between steps)."""
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise _Killed
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step)
        with pytest.raises(_Killed):
            method.apply(copy.deepcopy(model), CONFIG, tok, progress=False, **kwargs)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_resume_after_kills_mid_block_and_between_blocks_is_bit_exact(setup, tmp_path, monkeypatch):
    tok, calib, fp, _ = setup
    reference = copy.deepcopy(fp)
    plain = _method(calib, calib_tokens=1024)  # 32 windows: 8 steps per epoch, 16 per block
    report_plain = plain.apply(reference, CONFIG, tok, progress=False)
    method = _method(calib, calib_tokens=1024, work_dir=str(tmp_path / "work"), save_every=3)
    _run_killed(method, fp, tok, kill_at=8, monkeypatch=monkeypatch)  # block 0, last save at step 6
    _run_killed(method, fp, tok, kill_at=15, monkeypatch=monkeypatch)  # 10 more in block 0, then block 1 step 4
    resumed = copy.deepcopy(fp)
    report = method.apply(resumed, CONFIG, tok, progress=False)
    assert report["resumed_at"] == {"block": 1, "step": 3}
    _assert_same_state(resumed, reference)
    for a, b in zip(report["blocks"], report_plain["blocks"], strict=True):
        assert (a["mse_initial"], a["mse_final"]) == (b["mse_initial"], b["mse_final"])
    again = copy.deepcopy(fp)  # a finished run reruns to the same model
    assert method.apply(again, CONFIG, tok, progress=False)["resumed_at"] == {"block": 2, "step": 0}
    _assert_same_state(again, reference)
    with pytest.raises(LowbitError, match="other settings"):
        _method(calib, calib_tokens=1024, lr=0.05, work_dir=method.work_dir).apply(copy.deepcopy(fp), CONFIG, tok)


_KILLED_RUN = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_llama, tiny_tokenizer
from lowbit.train.blockap import BlockAP
from lowbit.quant.surgery import QuantConfig
tok = tiny_tokenizer()
calls = [0]
original = torch.optim.AdamW.step
def step(self, *a, **k):
    calls[0] += 1
    if calls[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *a, **k)
torch.optim.AdamW.step = step
method = BlockAP(**{settings!r})
method.apply(tiny_llama(vocab_size=len(tok)), QuantConfig(bits=2, group_size=32), tok, progress=False)
"""


def test_resume_after_sigkill_with_streams_on_disk_is_bit_exact(setup, tmp_path):
    tok, calib, fp, _ = setup
    settings = dict(calib=calib, calib_tokens=1024, seq_len=32, epochs=2, batch_size=4,
                    work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache"), save_every=5)
    script = _KILLED_RUN.format(tests=str(TESTS), kill_at=22, settings=settings)  # block 1, step 5 just saved
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any((tmp_path / "cache").iterdir())  # the dead run's scratch streams are still there
    resumed = copy.deepcopy(fp)
    report = BlockAP(**settings).apply(resumed, CONFIG, tok, progress=False)
    assert report["resumed_at"] == {"block": 1, "step": 5} and report["streams"] == "disk"
    assert not any((tmp_path / "cache").iterdir())  # ... removed, and this run's too
    reference = copy.deepcopy(fp)
    BlockAP(**{k: v for k, v in settings.items() if k not in ("work_dir", "cache_dir")}).apply(
        reference, CONFIG, tok, progress=False
    )
    _assert_same_state(resumed, reference)


def test_a_pre_quantized_mixed_precision_model_keeps_its_settings(setup):
    tok, calib, fp, evals = setup
    config = QuantConfig(
        bits=2, group_size=32, exclude=["*.k_proj"],
        overrides={"model.layers.0.*": {"bits": 4, "group_size": 16}, "*.mlp.down_proj": {"bits": 3, "quantizer": "minmax"}},
    )  # fmt: skip
    model = copy.deepcopy(fp)
    windows = calibration_windows(tok, calib, 2048, 32, "random", 0)
    gptq(model, config, windows, act_order=True, progress=False)
    before = {n: (m.quantizer.name, m.quantizer.bits, m.quantizer.group_size) for n, m in quantized_modules(model)}
    start = copy.deepcopy(model)
    with pytest.raises(LowbitError, match="reference"):
        _method(calib).apply(copy.deepcopy(model), CONFIG, tok, progress=False)
    report = _method(calib).apply(model, CONFIG, tok, progress=False, reference=fp)
    assert report["start"] == "given" and model.lowbit_config.to_dict() == config.to_dict()
    after = {n: (m.quantizer.name, m.quantizer.bits, m.quantizer.group_size) for n, m in quantized_modules(model)}
    assert after == before and after["model.layers.1.mlp.down_proj"] == ("minmax", 3.0, 32)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, QuantizedLinear)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, start.model.layers[0].self_attn.k_proj.weight)
    for block in report["blocks"]:
        assert block["mse_final"] < block["mse_initial"], block
    zero = model.model.layers[1].mlp.down_proj.quantizer.zero  # trained zero points: integers on the grid
    assert torch.equal(zero, zero.round()) and 0 <= zero.min() and zero.max() <= 7
    assert _kl(model, fp, evals) < _kl(start, fp, evals)


def test_resume_of_a_pre_quantized_start_is_bit_exact_and_checks_the_start(setup, tmp_path, monkeypatch):
    tok, calib, fp, _ = setup
    start = copy.deepcopy(fp)
    rtn(start, QuantConfig(bits=3, group_size=16, overrides={"*.mlp.*": {"bits": 2, "quantizer": "minmax"}}))
    reference = copy.deepcopy(start)
    _method(calib, calib_tokens=1024).apply(reference, CONFIG, tok, progress=False, reference=fp)
    method = _method(calib, calib_tokens=1024, work_dir=str(tmp_path / "work"), save_every=4)
    _run_killed(method, start, tok, kill_at=11, monkeypatch=monkeypatch, reference=fp)  # block 0, saved at step 8
    other = copy.deepcopy(start)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.quantizer.alpha.mul_(1.01)
    with pytest.raises(LowbitError, match="start point"):
        method.apply(other, CONFIG, tok, progress=False, reference=fp)
    resumed = copy.deepcopy(start)
    assert method.apply(resumed, CONFIG, tok, progress=False, reference=fp)["resumed_at"] == {"block": 0, "step": 8}
    _assert_same_state(resumed, reference)


@pytest.mark.parametrize(
    "bad", [{"epochs": 0}, {"epochs": -1}, {"lr": 0.0}, {"lr": -1e-4}, {"lr_scale": -1.0}, {"init": "awq"},
            {"batch_size": 0}, {"max_cache_gb": 0}],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(LowbitError, match="Block-AP setting"):
        BlockAP(**bad)


def test_work_dir_of_something_else_is_refused(setup, tmp_path):
    tok, calib, fp, _ = setup
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match="something else"):
        _method(calib, work_dir=str(tmp_path)).apply(copy.deepcopy(fp), CONFIG, tok, progress=False)


def test_registered_and_on_the_command_line(capsys, tmp_path, tiny_model_dir, sample_text_file):
    from lowbit.cli.main import main

    assert method_class("blockap") is BlockAP
    assert make_method("blockap", epochs=3, damp=0.1).epochs == 3  # other methods' settings ignored
    out = tmp_path / "q"
    code = main(["quantize", "--model", str(tiny_model_dir), "--method", "blockap", "--bits", "2", "--group-size",
                 "32", "--init", "rtn", "--calib", str(sample_text_file), "--calib-tokens", "256", "--seq-len", "32",
                 "--sample", "first", "--epochs", "1", "--lr", "0.02", "--lr-scale", "0.001", "--out", str(out),
                 "--json"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "lowbit.json").read_text())["info"]
    assert info["method"] == "blockap" and info["settings"]["lr_scale"] == 0.001
    assert len(info["report"]["blocks"]) == 2
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "blockap", "--bits", "2", "--epochs",
                 "0", "--out", str(tmp_path / "bad")]) != 0  # fmt: skip
    assert "epochs" in capsys.readouterr().err


def test_time_budget_cuts_steps_per_block_and_resume_keeps_them(setup, tmp_path, monkeypatch):
    import lowbit.train.blockap as bw

    tok, calib, fp, _ = setup
    clock = iter(range(0, 10**6))  # a fake clock: every time.time() call advances one "second"
    monkeypatch.setattr(bw.time, "time", lambda: float(next(clock)))
    method = _method(calib, epochs=4, time_budget=40.0, work_dir=str(tmp_path / "w"))  # 0.5 fake s per step
    report = method.apply(copy.deepcopy(fp), CONFIG, tok, progress=False)
    asked = 4 * 2048 // 32 // 4  # epochs x windows / batch = 64 steps per block
    fitted = report["steps_per_block"]
    assert 2 <= fitted < asked, report
    assert all(b["steps"] == fitted for b in report["blocks"])
    again = method.apply(copy.deepcopy(fp), CONFIG, tok, progress=False)  # finished run: same plan
    assert again["steps_per_block"] == fitted
    with pytest.raises(LowbitError, match="time_budget"):
        BlockAP(time_budget=0)


def test_normed_objective_reads_each_output_through_the_next_norm(setup):
    """The default objective sees block i's output as block i+1's input norm (the final norm after the last
    block) does, so one token with massive activations (SmolLM2's first position) cannot dominate it."""
    from lowbit.train.blockap import _next_norm

    _tok, _calib, fp, _evals = setup
    layers = fp.model.layers
    assert _next_norm(fp, layers, 0) is layers[1].input_layernorm
    assert _next_norm(fp, layers, len(layers) - 1) is fp.model.norm
    view = _next_norm(fp, layers, 0)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 64, generator=gen)
    out = y + 0.1 * torch.randn(2, 8, 64, generator=gen)
    massive_y, massive_out = y.clone(), out.clone()
    massive_y[:, 0] *= 1000  # the first position's state 1000x larger in target and output alike
    massive_out[:, 0] = massive_y[:, 0] + 0.1 * torch.randn(2, 64, generator=gen)

    def normed(a, b):
        return torch.nn.functional.mse_loss(view(a), view(b)).item()

    def raw(a, b):
        return torch.nn.functional.mse_loss(a, b).item()

    # the raw MSE follows the first position's error alone (its energy is ~1e6 times each other token's);
    # through the norm every token counts by its error relative to its own size
    assert abs(raw(massive_out, massive_y) - raw(out, y)) < 0.2 * raw(out, y)
    assert normed(massive_out, massive_y) < 0.9 * normed(out, y)
    weights = {"normed": None, "mse": None}
    for loss in weights:
        model = copy.deepcopy(fp)
        rtn(model, CONFIG)
        method = _method(_calib, loss=loss)
        weights[loss] = method.apply(model, CONFIG, _tok, progress=False, reference=fp)["blocks"]
    assert all(b["mse_final"] < b["mse_initial"] for b in weights["normed"] + weights["mse"])
    assert [b["mse_initial"] for b in weights["normed"]] != [b["mse_initial"] for b in weights["mse"]]


def test_check_windows_are_never_trained_on_and_carry_the_error_report(setup, monkeypatch):
    from lowbit.train import blockap as blockwise

    tok, calib, fp, _evals = setup
    seen = set()  # every window index of every training mini-batch
    original_order = blockwise._Run._order

    def order(self, block, epoch):
        batches = original_order(self, block, epoch)
        seen.update(int(i) for batch in batches for i in batch)
        return batches

    monkeypatch.setattr(blockwise._Run, "_order", order)
    model = copy.deepcopy(fp)
    rtn(model, CONFIG)
    start = copy.deepcopy(model)
    report = _method(calib, check_windows=16).apply(model, CONFIG, tok, progress=False, reference=fp)
    n = report["windows"]  # 2048 tokens in windows of 32: 64, the last 16 held out
    assert n == 64 and seen and max(seen) < n - 16 and len(seen) == n - 16
    # the before/after errors are those of the held-out windows: recomputed here for block 0
    ids = calibration_windows(tok, calib, 2048, 32, "random", 0)[n - 16 :]
    layer = fp.model.layers[0]

    def block0_error(m):
        from lowbit.ptq.blocks import capture_block_inputs

        x, kw = capture_block_inputs(fp, fp.model.layers, [ids])[0]
        xq, kwq = capture_block_inputs(m, m.model.layers, [ids])[0]
        with torch.no_grad():
            y = layer(x, **kw)
            y = y[0] if isinstance(y, tuple) else y
            out = m.model.layers[0](xq, **kwq)
            out = out[0] if isinstance(out, tuple) else out
        return ((out - y).double().pow(2).sum() / y.double().pow(2).sum()).item()

    assert report["blocks"][0]["mse_initial"] == pytest.approx(block0_error(start), rel=1e-5)
    assert report["blocks"][0]["mse_final"] == pytest.approx(block0_error(model), rel=1e-5)
    with pytest.raises(LowbitError, match="multiple of batch_size"):
        BlockAP(check_windows=3)
