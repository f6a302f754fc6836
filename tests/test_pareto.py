"""lowbit pareto: keys, the crash-safe results store, cached evaluation, frontier, report, CLI."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import cache_reference, evaluate
from lowbit.pareto import (
    ResultStore,
    SweepSpec,
    mark_frontier,
    plan_points,
    point_key,
    run_sweep,
    summary_lines,
)
from lowbit.pareto import spec as pareto_spec
from lowbit.pareto import sweep as pareto_sweep
from lowbit.ptq import methods
from lowbit.ptq.gptq import rtn
from lowbit.quant.surgery import QuantConfig
from lowbit.train.method import QAT

CHROMIUM = Path("/usr/bin/chromium")
# Numbers that must repeat exactly on a re-run (timings and run ids may not).
MEASURED = (
    "total_bytes",
    "bits_per_weight",
    "bits_per_weight_linear",
    "perplexity",
    "kl_to_reference",
    "top1_agreement",
    "tokens",
)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A saved tiny Llama folder and a text file for eval and calibration."""
    root = tmp_path_factory.mktemp("pareto-assets")
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    (root / "sample.txt").write_text(SAMPLE_TEXT)
    return root / "tiny-llama", root / "sample.txt"


def tiny_spec(model_dir, text, **overrides) -> SweepSpec:
    settings = dict(
        models=[str(model_dir)],
        bits=[4, 2],
        methods=["rtn", "gptq"],
        group_sizes=[None, 32],
        data=str(text),
        calib=str(text),
        max_tokens=512,
        calib_tokens=256,
        seq_len=64,
        peers=[],
    )
    return SweepSpec(**{**settings, **overrides})


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_sweep(tiny_assets, tmp_path_factory):
    model_dir, text = tiny_assets
    out = tmp_path_factory.mktemp("pareto-sweep")
    result = run_sweep(tiny_spec(model_dir, text), out, progress=False, log=lambda _msg: None)
    return out, result


# ---------------------------------------------------------------- plan and keys


def test_plan_starts_with_the_reference_and_keys_are_stable():
    fp = {"wiki-eval": "aaaa", "wiki-calib": "bbbb"}
    spec = SweepSpec(bits=[2, 4, 3], methods=["rtn", "gptq"], group_sizes=["channel", 128])
    plan = plan_points(spec, "smollm2-135m", fp)
    assert plan[0]["method"] == "fp"
    assert len(plan) == 1 + 2 * 3 * 2
    assert [p["bits"] for p in plan[1:4:2]] == [4.0, 3.0]  # bits sorted high to low
    keys = [point_key(p) for p in plan]
    assert len(set(keys)) == len(keys)
    assert keys == [
        point_key(p)
        for p in plan_points(
            SweepSpec(bits=[4, 3, 2], methods=["rtn", "gptq"], group_sizes=[None, 128]), "smollm2-135m", fp
        )
    ]
    changed = [
        plan_points(SweepSpec(seed=1), "smollm2-135m", fp)[1],
        plan_points(SweepSpec(max_tokens=2048), "smollm2-135m", fp)[1],
        plan_points(SweepSpec(), "smollm2-135m", {**fp, "wiki-eval": "cccc"})[1],
        plan_points(SweepSpec(), "gemma3-270m", fp)[1],
    ]
    assert all(point_key(p) not in keys for p in changed)
    rtn_point = next(p for p in plan if p["method"] == "rtn")
    gptq_point = next(p for p in plan if p["method"] == "gptq")
    assert "calib" not in rtn_point and gptq_point["calib_sha256"] == "bbbb"


# Keys of points stored before methods declared their own sweep settings (KEY_VERSION 1; the default
# sweep then evaluated 8192 tokens): a store written then must still be recognised, so these may never change.
OLD_KEYS = {
    ("fp", None, None): "0366ebd2bceb84064419",
    ("rtn", 4.0, None): "cb52f17e58affb8d7fa1",
    ("rtn", 4.0, 128): "c0e6cecb166ec7771ca4",
    ("rtn", 3.0, 128): "4a277b487a9bb4343f32",
    ("rtn", 2.0, None): "e5657e5734f876698e97",
    ("gptq", 4.0, 128): "8a015774621dc19e8e0e",
    ("gptq", 3.0, None): "5ba8af42171e45663c3a",
    ("gptq", 2.0, 128): "74d2105d86ec49162c6e",
}


def test_keys_of_points_stored_before_are_unchanged():
    fp = {"wiki-eval": "aaaa", "wiki-calib": "bbbb", "wiki-train": "cccc"}
    plan = plan_points(SweepSpec(group_sizes=[None, 128], max_tokens=8192), "smollm2-135m", fp)
    keys = {(p["method"], p.get("bits"), p.get("group_size")): point_key(p) for p in plan}
    assert {k: keys[k] for k in OLD_KEYS} == OLD_KEYS
    qat = SweepSpec(methods=["qat"], qat_steps=8, bits=[2], group_sizes=[64], max_tokens=8192)
    qat = plan_points(qat, "smollm2-135m", fp)
    assert point_key(qat[1]) == "a0de2a1c1da33d17d136"
    gptq = SweepSpec(methods=["gptq"], bits=[3], group_sizes=[64], gptq_settings={"sample": "random"}, max_tokens=8192)
    assert point_key(plan_points(gptq, "smollm2-135m", fp)[1]) == "613237a91e348c8da717"


def test_default_spec_adds_byte_budget_points_and_llamacpp_types(monkeypatch):
    fp = {"wiki-eval": "aaaa", "wiki-calib": "bbbb"}
    spec = SweepSpec()
    assert spec.methods == ["rtn", "gptq", "auto"] and spec.budget_bpw == [4.5, 3.5, 2.5]
    assert spec.bits == [4.0, 3.0, 2.0] and spec.group_sizes == [128]
    plan = plan_points(spec, "smollm2-135m", fp)
    assert [p["method"] for p in plan] == ["fp"] + ["rtn"] * 3 + ["gptq"] * 3 + ["auto"] * 3
    budget = [p for p in plan if p["method"] == "auto"]
    assert [p["budget_bpw"] for p in budget] == [4.5, 3.5, 2.5]
    for p in budget:  # the text, its hash and the pipeline's settings are in the key; no single width
        assert "bits" not in p and p["calib_sha256"] == "bbbb" and p["rotation"] == "auto"
        assert p["time_budget"] is None and p["then_method"] == "gptq" and p["fisher_tokens"] > 0
    assert len({point_key(p) for p in plan}) == len(plan)
    changed = plan_points(SweepSpec(calib_tokens=4096), "smollm2-135m", fp)[-1]
    assert point_key(changed) != point_key(budget[-1])
    assert spec.peers == (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])
    assert SweepSpec(peers=["none"]).peers == []
    monkeypatch.setattr(pareto_spec, "llama_cpp_available", lambda: False)
    assert SweepSpec().peers == []
    monkeypatch.setattr(pareto_spec, "llama_cpp_available", lambda: True)
    assert SweepSpec().peers == ["llama.cpp"]


def test_methods_are_those_that_declare_sweep_settings():
    assert set(pareto_spec.sweep_method_names()) == {"rtn", "gptq", "qat", "auto"}
    assert not hasattr(methods, "SWEEPABLE")
    with pytest.raises(LowbitError, match="unknown method"):
        SweepSpec(methods=["blockap"])  # registered, but declares no sweep points


def test_qat_points_need_a_step_budget():
    fp = {"wiki-eval": "a", "wiki-calib": "b", "wiki-train": "c"}
    assert all(p["method"] != "qat" for p in plan_points(SweepSpec(methods=["rtn", "qat"]), "m", fp))
    with_budget = plan_points(SweepSpec(methods=["rtn", "qat"], qat_steps=10, group_sizes=[None, 128]), "m", fp)
    assert sum(p["method"] == "qat" for p in with_budget) == 6


@dataclass
class FakeQAT:
    """Stands in for ``lowbit.train.QAT`` behind ``make_method("qat", ...)``: quantizes with RTN and
    reports a training record, so the sweep's handling of a training method is tested without training."""

    name: ClassVar[str] = "qat"
    kind: ClassVar[str] = "training"
    built: ClassVar[list[dict]] = []
    sweep_settings = classmethod(QAT.sweep_settings.__func__)  # the real method's points

    steps: int = 0
    data: str = ""
    seq_len: int = 0
    seed: int = 0
    settings: dict | None = None

    def __post_init__(self):
        FakeQAT.built.append(asdict(self))

    def apply(self, model, config, tokenizer=None, progress=True) -> dict:
        rtn(model, config)
        record = {"steps": self.steps, "train_tokens": 123, "first_loss": 2.5, "final_loss": 1.5}
        return {**record, "data": {"name": self.data}, "metrics": [{"loss": 2.5}, {"loss": 1.5}]}


@pytest.fixture
def fake_qat(monkeypatch):
    FakeQAT.built = []
    monkeypatch.setitem(methods._REGISTRY, "qat", FakeQAT)
    return FakeQAT


def test_qat_points_are_built_with_make_method_and_keep_the_training_record(tiny_assets, tmp_path, fake_qat):
    model_dir, text = tiny_assets
    spec = tiny_spec(
        model_dir,
        text,
        methods=["qat"],
        bits=[2],
        group_sizes=[None],
        qat_steps=3,
        qat_data=str(text),
        qat_settings={"batch_size": 2},
    )
    result = run_sweep(spec, tmp_path, progress=False, log=lambda _msg: None)
    assert result["computed"] == 2
    assert fake_qat.built == [
        {"steps": 3, "data": str(text), "seq_len": 64, "seed": 0, "settings": {"warmup": 2, "batch_size": 2}}
    ]
    qat = next(r for r in read_lines(tmp_path) if r["method"] == "qat")
    assert qat["qat"] == {
        "steps": 3,
        "train_tokens": 123,
        "first_loss": 2.5,
        "final_loss": 1.5,
        "data": {"name": str(text)},
    }  # the per-step metrics stay out of the record
    assert qat["settings"]["qat_steps"] == 3 and qat["settings"]["qat_data_sha256"]


def test_a_method_that_cannot_be_built_fails_before_any_compute(tiny_assets, tmp_path, monkeypatch):
    model_dir, text = tiny_assets

    @dataclass
    class Broken(FakeQAT):
        def __post_init__(self):
            raise LowbitError("QAT cannot run here")

    monkeypatch.setitem(methods._REGISTRY, "qat", Broken)
    with pytest.raises(LowbitError, match="QAT cannot run here"):
        run_sweep(tiny_spec(model_dir, text, methods=["rtn", "qat"], qat_steps=5), tmp_path, progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def _real_qat() -> bool:
    try:
        methods.method_class("qat")
    except (ImportError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _real_qat(), reason="lowbit.train has no QAT method class")
def test_qat_points_train_with_lowbit_qat(tiny_assets, tmp_path):
    model_dir, text = tiny_assets
    spec = tiny_spec(
        model_dir,
        text,
        methods=["rtn", "qat"],
        bits=[2],
        group_sizes=[None],
        qat_steps=2,
        qat_data=str(text),
        qat_settings={"batch_size": 2},
    )
    result = run_sweep(spec, tmp_path, progress=False, log=lambda _msg: None)
    assert result["computed"] == 3
    qat = next(r for r in read_lines(tmp_path) if r["method"] == "qat")
    assert qat["qat"]["steps"] == 2 and qat["settings"]["qat_settings"] == {"batch_size": 2}
    assert qat["kl_to_reference"] > 0 and qat["quantizer"] == "seq"


def test_spec_rejects_bad_settings():
    with pytest.raises(LowbitError, match="method"):
        SweepSpec(methods=["awq"])
    with pytest.raises(LowbitError, match="bit-width"):
        SweepSpec(bits=[5])
    with pytest.raises(LowbitError, match="unknown sweep setting"):
        SweepSpec.from_dict({"bitz": [4]})
    for bad in (0, 16, float("nan")):
        with pytest.raises(LowbitError, match="bits per weight"):
            SweepSpec(budget_bpw=[bad])


# ---------------------------------------------------------------- results store


def test_store_ignores_and_repairs_a_torn_last_line(tmp_path):
    with ResultStore(tmp_path) as store:
        store.append({"key": "a", "value": 1})
        store.append({"key": "b", "value": 2})
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"key": "c", "val')  # a write cut short by a kill
    with ResultStore(tmp_path) as store:  # opening repairs the file
        assert set(store.read()) == {"a", "b"}
        store.append({"key": "c", "value": 3})
        assert {k: r["value"] for k, r in store.read().items()} == {"a": 1, "b": 2, "c": 3}
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3


def test_read_skips_a_torn_line_without_repair(tmp_path):
    (tmp_path / "results.jsonl").write_bytes(b'{"key": "a"}\n{"key": "b", "x": [1,')
    assert set(ResultStore(tmp_path).read()) == {"a"}


def test_store_refuses_a_second_writer(tmp_path):
    with ResultStore(tmp_path):
        with pytest.raises(LowbitError, match="another lowbit pareto sweep"):
            with ResultStore(tmp_path):
                pass


# ---------------------------------------------------------------- cached evaluation


def test_cached_evaluation_equals_evaluate_with_a_reference_module():
    tokenizer = tiny_tokenizer()
    reference = tiny_llama(vocab_size=len(tokenizer))
    ids = torch.tensor(tokenizer(SAMPLE_TEXT)["input_ids"][: 6 * 32]).view(6, 32)
    model = rtn(copy.deepcopy(reference), QuantConfig(bits=2, group_size=32))
    with torch.inference_mode():
        cache = cache_reference(reference, ids, batch_size=4, progress=False)
        direct = evaluate(model, ids, reference=reference, batch_size=4, progress=False)
        cached = evaluate(model, cache.windows, reference=cache, progress=False)
        fp = evaluate(reference, ids, reference=reference, batch_size=4, progress=False)
    assert (cached.pop("reference_mode"), direct.pop("reference_mode")) == ("cached-full", "model-alongside")
    assert cached == direct
    assert direct["kl_to_reference"] > 0
    assert (cache.result.pop("reference_mode"), fp.pop("reference_mode")) == ("self", "model-alongside")
    assert cache.result == fp
    assert cache.result["kl_to_reference"] == 0.0 and cache.result["top1_agreement"] == 1.0


def test_sweep_refuses_a_reference_cache_larger_than_free_memory(tiny_assets, tmp_path, monkeypatch):
    model_dir, text = tiny_assets
    monkeypatch.setattr(pareto_sweep, "free_memory", lambda: 100_000)  # the cache needs 8 * 63 * 128 * 4 bytes
    with pytest.raises(LowbitError, match="lower --max-tokens"):
        run_sweep(tiny_spec(model_dir, text), tmp_path, progress=False, log=lambda _msg: None)


# ---------------------------------------------------------------- frontier


def _point(name, size, kl, method="rtn"):
    return {"model": "m", "key": name, "method": method, "total_bytes": size, "kl_to_reference": kl}


def test_frontier_keeps_only_undominated_points():
    points = [
        _point("fp", 1000, 0.0, "fp"),
        _point("a", 100, 0.5),
        _point("b", 200, 0.2),
        _point("c", 200, 0.3),  # same size as b, worse KL
        _point("d", 300, 0.2),  # bigger than b, same KL
        _point("e", 50, 0.9),
        _point("f", 50, 0.9),  # identical points dominate nothing
        {**_point("x", 10, 5.0), "model": "other"},  # another model is its own frontier
    ]
    ranked = mark_frontier(points)
    on = {p["key"] for p in ranked if p["frontier"]}
    assert on == {"fp", "a", "b", "e", "f", "x"}
    assert [p["key"] for p in ranked if p["model"] == "m"][:3] == ["fp", "b", "d"]  # ranked by KL


# ---------------------------------------------------------------- sweep, resume, reproducibility


def test_sweep_measures_every_point(tiny_sweep):
    out, result = tiny_sweep
    lines = read_lines(out)
    assert result["points"] == len(lines) == 1 + 2 * 2 * 2 and result["computed"] == len(lines)
    fp = lines[0]
    assert fp["method"] == "fp" and fp["kl_to_reference"] == 0.0 and fp["bits"] == 32.0
    for r in lines:
        for name in (
            "model",
            "method",
            "bits",
            "quantizer",
            "group_size",
            "total_bytes",
            "bits_per_weight",
            "bits_per_weight_linear",
            "perplexity",
            "kl_to_reference",
            "top1_agreement",
            "tokens",
            "seq_len",
            "seconds",
            "seed",
            "settings",
            "key",
            "run_id",
            "computed_at",
        ):
            assert name in r, name
        assert r["tokens"] == 8 * 63 and r["seq_len"] == 64
        assert r["key"] == point_key(r["settings"])
    quant = lines[1:]
    assert all(r["total_bytes"] < fp["total_bytes"] and r["kl_to_reference"] > 0 for r in quant)
    two_bit = [r for r in quant if r["bits"] == 2]
    four_bit = [r for r in quant if r["bits"] == 4]
    assert max(r["total_bytes"] for r in two_bit) < min(r["total_bytes"] for r in four_bit)
    assert {r["quantizer"] for r in two_bit} == {"seq"} and {r["quantizer"] for r in four_bit} == {"lsq"}


def test_rerun_skips_stored_points_and_repeats_the_numbers(tiny_sweep, tiny_assets, tmp_path):
    out, _ = tiny_sweep
    model_dir, text = tiny_assets
    before = (out / "results.jsonl").read_bytes()
    again = run_sweep(tiny_spec(model_dir, text), out, progress=False, log=lambda _msg: None)
    assert again["computed"] == 0 and again["skipped"] == again["points"]
    assert (out / "results.jsonl").read_bytes() == before
    # A fresh folder, holding only some of the points, recomputes them to the same numbers: same seed,
    # same result, and no point depends on the points measured before it (the reference stays untouched).
    subset = run_sweep(
        tiny_spec(model_dir, text, methods=["gptq"], bits=[2], group_sizes=[32]), tmp_path, progress=False
    )
    assert subset["computed"] == subset["points"] == 2
    old = {r["key"]: r for r in read_lines(out)}
    for r in read_lines(tmp_path):
        assert {k: r[k] for k in MEASURED} == {k: old[r["key"]][k] for k in MEASURED}


_SLOW_SWEEP = """
import os, sys, time
import lowbit.pareto.sweep as sweep
measure = sweep.measure_point
def slow_measure(settings, *args, **kwargs):
    if settings["method"] != "fp":
        time.sleep(float(os.environ["PARETO_TEST_DELAY"]))
    return measure(settings, *args, **kwargs)
sweep.measure_point = slow_measure
from lowbit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_without_recomputing(tiny_assets, tmp_path):
    model_dir, text = tiny_assets
    out = tmp_path / "out"
    argv = [
        "--threads",
        "1",
        "pareto",
        "--model",
        str(model_dir),
        "--data",
        str(text),
        "--calib",
        str(text),
        "--max-tokens",
        "512",
        "--calib-tokens",
        "256",
        "--seq-len",
        "64",
        "--bits",
        "4",
        "2",
        "--methods",
        "rtn",
        "gptq",
        "--group-sizes",
        "channel",
        "32",
        "--peers",
        "none",
        "--out",
        str(out),
        "--json",
    ]
    script = tmp_path / "slow_sweep.py"
    script.write_text(_SLOW_SWEEP)
    env = {**os.environ, "PARETO_TEST_DELAY": "2"}
    proc = subprocess.Popen(
        [sys.executable, str(script), *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    results = out / "results.jsonl"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if results.exists() and len(results.read_bytes().splitlines()) >= 2:  # FP + first quantized point
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    first = read_lines(out)
    assert 2 <= len(first) < 9
    assert len({r["run_id"] for r in first}) == 1
    with open(results, "ab") as f:  # and a torn line, as a kill during a write leaves
        f.write(b'{"key": "torn", "perplexity": 1')

    assert main(argv) == 0
    lines = read_lines(out)
    assert len(lines) == 9 and len({r["key"] for r in lines}) == 9
    assert lines[: len(first)] == first  # finished points were kept, not recomputed
    assert all(r["run_id"] != first[0]["run_id"] for r in lines[len(first) :])
    assert main(argv) == 0  # a third run has nothing left to do
    assert read_lines(out) == lines


# ---------------------------------------------------------------- byte-budget points


def test_budget_points_run_the_byte_budget_pipeline(tiny_assets, tmp_path, capsys):
    model_dir, text = tiny_assets
    spec = tiny_spec(model_dir, text, methods=["gptq", "auto"], bits=[2], group_sizes=[32], budget_bpw=[2.5, 3])
    result = run_sweep(spec, tmp_path, progress=True, log=lambda _msg: None)
    assert capsys.readouterr().out == ""  # the plan table went to stderr: stdout is the summary's
    assert result["computed"] == result["points"] == 4
    lines = read_lines(tmp_path)
    budget = [r for r in lines if r["method"] == "auto"]
    assert [r["budget_bpw"] for r in budget] == [3.0, 2.5]
    for r in budget:
        assert r["key"] == point_key(r["settings"]) and r["bits"] is None and r["group_size"] is None
        assert r["rotated"] is True and r["bits_per_weight_linear"] <= r["budget_bpw"]
        assert [s["stage"] for s in r["auto"]["stages"]] == ["rotation", "sensitivities", "plan+gptq"]
        assert r["auto"]["skipped"] == {"blockap": "no --time-budget given", "e2e": "no --time-budget given"}
        assert r["auto"]["plan"]["plan_summary"] and "plan" not in r["auto"]["plan"]  # the summary, not every layer
    gptq = next(r for r in lines if r["method"] == "gptq")
    assert gptq["rotated"] is False
    assert budget[1]["total_bytes"] < budget[0]["total_bytes"]
    markdown = (tmp_path / "results.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for label in ("budget 3 b/w (rotated)", "budget 2.5 b/w (rotated)"):
        assert label in markdown and label in html
    assert "per-layer plan" in markdown and "Byte-budget points (budget 3, 2.5 bits/weight" in markdown
    assert any("budget 2.5 b/w (rotated)" in line for line in result["summary"])  # on the frontier or dominated
    again = run_sweep(spec, tmp_path, progress=False, log=lambda _msg: None)
    assert again["computed"] == 0 and again["skipped"] == 4


def test_budget_points_share_their_sensitivities_and_equal_separate_runs(tiny_assets):
    from lowbit.budget.auto import Auto

    _, text = tiny_assets
    tokenizer = tiny_tokenizer()
    reference = tiny_llama(vocab_size=len(tokenizer))
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    budgets = [Auto(budget_bpw=b, calib=str(text), calib_tokens=256, seq_len=64) for b in (3.0, 2.5)]
    separate = []
    for method in budgets:
        model = copy.deepcopy(reference)
        separate.append((model, method.apply(model, QuantConfig(bits=4), tokenizer=tokenizer, progress=False)))
    shared = list(Auto.sweep_apply(budgets, reference, QuantConfig(bits=4), tokenizer=tokenizer, progress=False))
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())  # the reference is untouched
    for (model, report), (alone, alone_report) in zip(shared, separate, strict=True):
        state, expected = model.state_dict(), alone.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
        assert report["plan"]["plan"] == alone_report["plan"]["plan"]
        assert [s["stage"] for s in report["stages"]] == ["rotation", "sensitivities", "plan+gptq"]
        assert report["stages"][1]["shared_by"] == 2 and report["skipped"] == alone_report["skipped"]
    mixed = [budgets[0], Auto(budget_bpw=2.5, calib=str(text), calib_tokens=128, seq_len=64)]  # nothing to share
    reports = [r for _, r in Auto.sweep_apply(mixed, reference, QuantConfig(bits=4), tokenizer, progress=False)]
    assert [[s["stage"] for s in r["stages"]] for r in reports] == [["rotation", "budget+gptq"]] * 2


def test_plot_draws_budget_points_on_their_own_line(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from lowbit.pareto.plot import plot_pareto

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    fp = {"model": "m", "method": "fp", "total_bytes": 1000, "kl_to_reference": 0.0, "perplexity": 10.0,
          "bits": 32.0, "group_size": None, "tokens": 63}  # fmt: skip
    rtn4 = {**fp, "method": "rtn", "total_bytes": 300, "kl_to_reference": 0.2, "perplexity": 11.0, "bits": 4.0,
            "group_size": 32}  # fmt: skip
    budget = {**fp, "method": "auto", "total_bytes": 250, "kl_to_reference": 0.1, "perplexity": 10.5, "bits": None,
              "budget_bpw": 3.5, "rotated": True}  # fmt: skip
    plot_pareto(mark_frontier([fp, rtn4, budget]), tmp_path / "p.png")
    ax_kl = kept[0].axes[0]
    assert {"RTN g32", "budget (rotated)"} <= {t.get_text() for t in ax_kl.get_legend().get_texts()}
    assert {"4b", "3.5 b/w"} <= {t.get_text() for t in ax_kl.texts}


def test_without_llama_cpp_the_summary_says_its_types_were_not_measured(monkeypatch):
    monkeypatch.setattr(pareto_spec, "llama_cpp_available", lambda: False)
    monkeypatch.setattr(pareto_sweep, "llama_cpp_available", lambda: False)
    spec = SweepSpec()
    assert spec.peers == []
    (note,) = pareto_sweep.peer_notes(spec)
    assert "llama-cpp-python is not installed" in note
    assert pareto_sweep.peer_notes(SweepSpec(peers=["llama.cpp"])) == []  # asked for: check() says why it cannot run
    monkeypatch.setattr(pareto_sweep, "llama_cpp_available", lambda: True)
    assert pareto_sweep.peer_notes(SweepSpec(peers=["none"])) == []


def test_llamacpp_quantizer_warnings_go_to_a_file_behind_one_line(tmp_path, capfd):
    from lowbit.peers.llamacpp_peer import _fallback_line, _stderr_to

    said = (
        b"warning: blk.0.attn_q.weight - ncols 576 not divisible by 256 (required for type q4_K) -> falling back\n"
        b"llama_model_quantize_impl: WARNING: 180 of 272 tensor(s) required fallback quantization\n"
    )
    with _stderr_to(tmp_path / "q.log"):
        os.write(2, said)  # as llama.cpp's C code writes, below Python's sys.stderr
    assert capfd.readouterr().err == ""
    text = (tmp_path / "q.log").read_text()
    assert "falling back" in text
    assert _fallback_line(text) == "180 of 272 tensor(s) required fallback quantization"
    assert _fallback_line("") is None
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"  # file descriptor 2 is back


# ---------------------------------------------------------------- report and CLI


def test_report_files(tiny_sweep):
    out, result = tiny_sweep
    html = (out / "report.html").read_text()
    markdown = (out / "results.md").read_text()
    png = (out / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert 'src="data:image/png;base64,' in html and "<table" in html
    assert html.count("<tr class=") == result["points"]
    assert markdown.count("\n| ") == result["points"] + 1  # rows + header rule
    assert "GPTQ 2-bit g32" in html and "GPTQ 2-bit g32" in markdown
    assert "at &lt;= " in html and "KL" in html
    assert "504 predicted tokens in 8 non-overlapping windows of 64 tokens" in html


def test_summary_names_the_best_point_per_budget(tiny_sweep):
    out, _ = tiny_sweep
    records = mark_frontier(read_lines(out))
    lines = summary_lines(records)
    assert any("the full-precision reference (FP32, as loaded)" in line and "float16" in line for line in lines)
    assert any("matched settings" in line for line in lines)
    best_small = min((r for r in records if r["frontier"] and r["method"] != "fp"), key=lambda r: r["total_bytes"])
    assert any(line.startswith(f"tiny-llama: at <= {best_small['total_bytes'] / 1e6:.4g} MB") for line in lines)


def _chromium(*args, user_dir) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_dir}",
    ]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(tiny_sweep, tmp_path):
    from PIL import Image

    out, result = tiny_sweep
    url = (out / "report.html").resolve().as_uri()
    dom = _chromium("--dump-dom", url, user_dir=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    text = dom.stdout.decode()
    assert text.count('<tr class="') == result["points"]
    assert 'id="pareto-plot"' in text and "data:image/png;base64," in text
    assert "GPTQ 4-bit per-channel" in text and "RTN 2-bit g32" in text
    shot = tmp_path / "report.png"
    run = _chromium(
        f"--screenshot={shot}", "--window-size=1400,2200", "--hide-scrollbars", url, user_dir=tmp_path / "profile-shot"
    )
    assert run.returncode == 0 and shot.exists(), run.stderr.decode()[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 2200)
    assert len(image.resize((140, 220)).getcolors(256)) > 20  # text, table and plot, not a blank page


def test_cli_pareto_with_config_file(tiny_assets, tmp_path, capsys):
    model_dir, text = tiny_assets
    config = tmp_path / "sweep.json"
    config.write_text(
        json.dumps(
            {
                "models": str(model_dir),
                "bits": [4],
                "methods": ["rtn"],
                "group_sizes": ["channel"],
                "data": str(text),
                "max_tokens": 1024,
                "seq_len": 64,
                "seed": 3,
            }
        )
    )
    out = tmp_path / "out"
    argv = ["pareto", "--config", str(config), "--max-tokens", "256", "--peers", "none", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["points"] == 2 and result["computed"] == 2
    lines = read_lines(out)
    assert [r["method"] for r in lines] == ["fp", "rtn"]
    assert lines[1]["settings"]["max_tokens"] == 256 and lines[1]["seed"] == 3  # flag wins, config kept


def test_cli_reports_user_errors(tmp_path, capsys):
    assert main(["pareto", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "cannot read sweep config" in capsys.readouterr().err
    assert main(["pareto", "--bits", "5", "--out", str(tmp_path)]) == 2
    assert "unsupported bit-width" in capsys.readouterr().err
    assert main(["pareto", "--methods", "rtn", "--budget-bpw", "3", "--out", str(tmp_path)]) == 2
    assert "--budget-bpw only applies to byte-budget points" in capsys.readouterr().err
    assert main(["pareto", "--methods", "rtn", "--calib", "news", "--out", str(tmp_path)]) == 2
    assert "--calib only applies to GPTQ points and byte-budget points" in capsys.readouterr().err
    assert main(["pareto", "--budget-bpw", "16", "--out", str(tmp_path)]) == 2
    assert "bits per weight" in capsys.readouterr().err


def test_report_states_gptq_calibration_sampling():
    from lowbit.pareto.report import eval_description

    first = SweepSpec(methods=["gptq"], calib="wiki-train", calib_tokens=8192)
    rnd = SweepSpec(methods=["gptq"], calib="wiki-train", calib_tokens=65536,
                    gptq_settings={"sample": "random", "sequential": True})  # fmt: skip
    line = [t for t in eval_description([], first) if t.startswith("GPTQ calibration")][0]
    assert "first 8,192 tokens in windows of 512" in line
    line = [t for t in eval_description([], rnd) if t.startswith("GPTQ calibration")][0]
    assert "128 random windows of 512 tokens (seed 0)" in line and '"sequential": true' in line
