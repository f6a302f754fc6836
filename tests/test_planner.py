"""The byte-budget planner: exact byte costs, the knapsack against brute force, the Budget method end to end."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit.budget.allocation import Knapsack, allocate, cost_unit
from lowbit.budget.plan import DEFAULT_CANDIDATES, EMBEDDING_CANDIDATES, plan_from_tables, sensitivity_tables
from lowbit.budget.planner import Budget
from lowbit.budget.sensitivity import Setting
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import size_account
from lowbit.ptq.gptq import rtn
from lowbit.quant.surgery import QuantConfig, quantized_modules


def _brute_force(costs, losses, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if sum(costs[i][c] for i, c in enumerate(choice)) <= budget:
            loss = sum(losses[i][c] for i, c in enumerate(choice))
            best = loss if best is None else min(best, loss)
    return best


def _random_instance(rng: random.Random, layers: int, options: int):
    costs = [[rng.randint(10, 200) for _ in range(options)] for _ in range(layers)]
    losses = [[rng.uniform(0.0, 5.0) for _ in range(options)] for _ in range(layers)]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    return costs, losses, rng.randint(lo, hi)


def test_knapsack_in_single_bytes_is_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(40):
        costs, losses, budget = _random_instance(rng, layers=4, options=4)
        alloc = allocate(costs, losses, budget, unit=1)
        assert alloc.nbytes <= budget
        assert alloc.nbytes == sum(costs[i][c] for i, c in enumerate(alloc.choice))
        assert alloc.loss == pytest.approx(_brute_force(costs, losses, budget), abs=1e-9)
        assert alloc.lower_bound <= alloc.loss + 1e-9


def test_knapsack_in_coarse_units_fits_and_is_within_the_stated_tolerance():
    """Bytes rounded up to units of ``unit``: the plan still fits, and it is at least as good as the
    true optimum at a budget smaller by ``layers * unit`` bytes (allocation's docstring)."""
    rng = random.Random(1)
    unit = 7
    for _ in range(40):
        costs, losses, budget = _random_instance(rng, layers=4, options=4)
        if budget < sum(-(-min(c) // unit) * unit for c in costs):
            continue
        alloc = allocate(costs, losses, budget, unit=unit)
        assert alloc.nbytes <= budget
        optimum = _brute_force(costs, losses, budget)
        assert alloc.loss >= optimum - 1e-9
        assert alloc.lower_bound <= optimum + 1e-9
        worse_budget = _brute_force(costs, losses, budget - len(costs) * unit)
        if worse_budget is not None:
            assert alloc.loss <= worse_budget + 1e-9


def test_knapsack_more_budget_never_predicts_more_loss():
    rng = random.Random(2)
    costs, losses, _ = _random_instance(rng, layers=12, options=6)
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    unit = cost_unit(costs, resolution=300)
    assert unit > 1  # the unit is coarse here, and fixed by the tables, not the budget
    knapsack = Knapsack(costs, losses, hi)
    knapsack_coarse = Knapsack(costs, losses, hi, unit=unit)
    for k in (knapsack, knapsack_coarse):
        previous = float("inf")
        for budget in range(lo + k.unit * len(costs), hi + 1, 37):
            alloc = k.solve(budget)
            assert alloc.nbytes <= budget
            assert alloc.loss <= previous + 1e-12
            previous = alloc.loss


def test_knapsack_refuses_a_budget_below_the_cheapest_plan():
    with pytest.raises(LowbitError, match="below the smallest plan"):
        allocate([[10, 20], [30, 5]], [[1.0, 0.0], [0.0, 1.0]], budget=14)


@pytest.mark.parametrize("text", list(DEFAULT_CANDIDATES) + list(EMBEDDING_CANDIDATES))
def test_setting_bytes_equal_the_size_account(text):
    setting = Setting.parse(text)
    model = tiny_llama(hidden=128)
    cfg = QuantConfig(bits=setting.bits, quantizer=setting.quantizer, group_size=setting.group_size)
    if not setting.fits(128):
        pytest.skip(f"{text} does not fit rows of 128")
    rtn(model, cfg)
    predicted = sum(setting.nbytes(m.out_features, m.in_features) for _, m in quantized_modules(model))
    assert predicted == size_account(model)["linear_bytes"]


def test_setting_parse_round_trips_and_refuses_bad_text():
    assert str(Setting.parse("4:64:minmax")) == "4:64:minmax"
    assert Setting.parse("3:channel") == Setting(3.0, None, "auto")
    for bad in ("4", "4:64:nope", "5:64", "1.58:64:minmax", "4:-3", "1.58:channel:absmean"):
        with pytest.raises(LowbitError):
            Setting.parse(bad)


def test_budget_fields_refuse_nonsense():
    with pytest.raises(LowbitError, match="full precision"):
        Budget(budget_bpw=16)
    with pytest.raises(LowbitError, match="--budget-bpw or --budget-mb"):
        Budget()
    with pytest.raises(LowbitError, match="post-training"):
        Budget(budget_bpw=4, then_method="budget")


@pytest.fixture(scope="module")
def planned():
    """A tiny Llama, its tokenizer and a calibration text file, shared by the planning tests."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), hidden=128, layers=2)
    return model, tokenizer


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE_TEXT)
    return str(path)


def _budget(calib_file, **kw):
    return Budget(calib=calib_file, calib_tokens=256, seq_len=32, fisher_tokens=256, **kw)


def test_more_budget_never_predicts_more_loss_and_mixed_beats_uniform(planned, calib_file):
    model, tokenizer = planned
    config = QuantConfig(bits=4)
    method = _budget(calib_file, budget_bpw=4.0)
    tables, _ = sensitivity_tables(method, model, config, tokenizer, progress=False)
    losses = []
    for bpw in (2.5, 3.0, 3.5, 4.5, 6.0):
        plan = plan_from_tables(_budget(calib_file, budget_bpw=bpw), model, config, tables, None)
        assert plan.linear_bytes <= plan.budget_bytes
        losses.append(plan.predicted_loss)
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]
    # the uniform 3-bit g64 plan is one of the plans a budget of its bytes could pick
    uniform = Setting.parse("3:64:auto")
    idx = [t.settings.index(uniform) for t in tables]
    uniform_bytes = sum(t.nbytes[i] for t, i in zip(tables, idx, strict=True))
    uniform_loss = sum(t.loss[i] for t, i in zip(tables, idx, strict=True))
    bpw = 8 * uniform_bytes / plan.linear_params
    mixed = plan_from_tables(_budget(calib_file, budget_bpw=bpw), model, config, tables, None)
    assert mixed.linear_bytes <= uniform_bytes
    assert mixed.predicted_loss < uniform_loss
    assert len(mixed.summary()) > 1


def test_budget_quantizes_to_the_plan_and_the_folder_records_it(tiny_model_dir, calib_file, tmp_path):
    from lowbit.api import load, quantize_to_dir

    out = tmp_path / "q"
    method = _budget(calib_file, budget_bpw=3.5)
    result = quantize_to_dir(str(tiny_model_dir), str(out), QuantConfig(bits=4), method=method, progress=False)
    assert result["bits_per_weight_linear"] <= 3.5
    meta = json.loads((out / "lowbit.json").read_text())
    overrides = meta["quant_config"]["overrides"]
    assert meta["info"]["method"] == "budget" and meta["info"]["settings"]["budget_bpw"] == 3.5
    model, _, _ = load(str(out))
    assert set(overrides) == {n for n, _ in quantized_modules(model)}
    for name, info in meta["layers"].items():
        assert (info["bits"], info["group_size"]) == (overrides[name]["bits"], overrides[name]["group_size"])
    assert size_account(model)["bits_per_weight_linear"] == pytest.approx(result["bits_per_weight_linear"])


def test_budget_apply_reports_predicted_equal_to_achieved(planned, calib_file):
    _, tokenizer = planned
    model = tiny_llama(vocab_size=len(tokenizer), hidden=128, layers=2)
    report = _budget(calib_file, budget_bpw=3.0, then_method="rtn").apply(model, QuantConfig(bits=4), tokenizer, False)
    assert report["linear_bytes"] == report["predicted_linear_bytes"] <= report["budget_bytes"]
    assert report["bits_per_weight_linear"] == pytest.approx(size_account(model)["bits_per_weight_linear"])
    assert set(report["plan"]) == {n for n, _ in quantized_modules(model)}
    assert sum(report["plan_summary"].values()) == len(report["plan"])


def test_file_budget_quantizes_the_embedding_only_when_forced(calib_file, tmp_path):
    from lowbit.store.folder import save_quantized

    tokenizer = tiny_tokenizer()

    def run(mb):
        model = tiny_llama(vocab_size=len(tokenizer), hidden=128, layers=2)
        report = _budget(calib_file, budget_mb=mb).apply(model, QuantConfig(bits=4), tokenizer, False)
        return model, report

    model, report = run(0.2)
    assert report["plan_embeddings"] is None
    assert report["tensor_bytes"] == report["predicted_tensor_bytes"] == size_account(model)["total_bytes"]
    model_fp = tiny_llama(vocab_size=len(tokenizer), hidden=128, layers=2)
    emb_bytes = model_fp.get_input_embeddings().weight.numel() * 2
    smallest_linears = sum(
        Setting.parse("2:channel:auto").nbytes(*m.weight.shape)
        for n, m in model_fp.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    fixed = size_account(model)["total_bytes"] - report["linear_bytes"] - emb_bytes
    mb = (fixed + smallest_linears + emb_bytes - 1) / 1e6  # cannot fit with a high-precision embedding
    model, report = run(mb)
    assert report["plan_embeddings"] is not None
    assert report["tensor_bytes"] == report["predicted_tensor_bytes"]
    path = save_quantized(model, tokenizer, tmp_path / "q")
    weights_bytes = json.loads((path / "lowbit.json").read_text())["weights_bytes"]
    assert weights_bytes <= report["predicted_file_bytes_at_most"] <= mb * 1e6
    with pytest.raises(LowbitError, match="below the smallest file"):
        run(fixed / 1e6 / 2)
    with pytest.raises(LowbitError, match="use full precision"):
        run(100.0)


def test_cli_quantize_with_a_budget(tiny_model_dir, calib_file, tmp_path, capsys):
    from lowbit.cli.main import main

    out = tmp_path / "q"
    # a budget needs no --bits: the planner chooses every layer's setting (--method budget: the plan and
    # then_method only; without --method a budget runs auto, tested in tests/test_auto.py)
    argv = ["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--method", "budget"]
    argv += ["--budget-bpw", "4.5", "--then-method", "rtn", "--calib", calib_file, "--fisher-tokens", "256"]
    argv += ["--seq-len", "32", "--candidates", "4:64:auto", "2:32:minmax", "8:channel:auto", "--json"]
    assert main(argv) == 0
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["info"]["settings"]["calib"] == calib_file and meta["info"]["settings"]["seq_len"] == 32
    assert meta["info"]["method"] == "budget"
    assert {s["bits"] for s in meta["quant_config"]["overrides"].values()} <= {4.0, 2.0, 8.0}
    printed = json.loads(capsys.readouterr().out)
    assert printed["bits_per_weight_linear"] <= 4.5
    # the plan is recorded with the folder, and it is the plan that was stored
    report = meta["info"]["report"]
    assert report["bits_per_weight_linear"] == pytest.approx(printed["bits_per_weight_linear"])
    assert len(report["plan"]) == len(meta["quant_config"]["overrides"])


def test_file_budget_picks_a_six_bit_embedding_when_eight_does_not_fit(calib_file, tiny_model_dir, tmp_path,
                                                                         monkeypatch, capsys):
    """An embedding 1000x more sensitive than the tiny model's (its predicted losses scaled up), and a
    file budget that fits every 6-bit embedding option with the smallest linears but no 8-bit one: the DP
    takes 6 bits (4 would free bytes for the linears but lose more), the plan prints it, the folder records it."""
    import dataclasses

    from lowbit.api import quantize_to_dir
    from lowbit.budget import plan as planner
    from lowbit.eval.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    config = QuantConfig(bits=4)
    method = _budget(calib_file, budget_mb=1.0)
    tables, emb = sensitivity_tables(method, model, config, tokenizer, progress=False)
    emb = dataclasses.replace(emb, loss=[1000 * x for x in emb.loss])
    by_bits = {b: [i for i, s in enumerate(emb.settings) if s.bits == b] for b in (8, 6, 4)}
    assert all(by_bits.values())  # EMBEDDING_CANDIDATES offers all three widths
    assert max(emb.loss[i] for i in by_bits[6]) < min(emb.loss[i] for i in by_bits[4])
    planned = [m.weight for m in planner.planned_linears(model, config).values()]
    planned += [m.weight for m in planner._embedding_modules(model).values()]
    tensors, header = planner._fixed_bytes(model, config, planned)  # the file beyond the planned weights
    fixed = tensors + header + sum(min(t.nbytes) for t in tables)
    mb = (fixed + max(emb.nbytes[i] for i in by_bits[6])) / 1e6
    assert fixed + min(emb.nbytes[i] for i in by_bits[8]) > mb * 1e6  # no 8-bit embedding fits

    def only(bits):
        keep = by_bits[bits]
        return dataclasses.replace(emb, settings=[emb.settings[i] for i in keep],
                                   nbytes=[emb.nbytes[i] for i in keep], loss=[emb.loss[i] for i in keep])

    plan = plan_from_tables(_budget(calib_file, budget_mb=mb), model, config, tables, emb)
    chosen = emb.settings[plan.embedding_choice]
    assert chosen.bits == 6
    assert plan.predicted_loss < plan_from_tables(_budget(calib_file, budget_mb=mb), model, config, tables,
                                                  only(4)).predicted_loss
    with pytest.raises(LowbitError, match="below the smallest file"):
        plan_from_tables(_budget(calib_file, budget_mb=mb), model, config, tables, only(8))
    assert f"embedding and head: {chosen}" in plan.table()
    assert plan.record()["plan_embeddings"]["setting"] == str(chosen)

    import lowbit.budget.planner as budget_method

    for module in (planner, budget_method):  # the Budget method measures through the plan module's function
        monkeypatch.setattr(module, "sensitivity_tables", lambda *a, **k: (tables, emb))
    out = tmp_path / "q"
    quantize_to_dir(str(tiny_model_dir), str(out), config, method=_budget(calib_file, budget_mb=mb, then_method="rtn"),
                    progress=True)
    assert f"embedding and head: {chosen}" in capsys.readouterr().out
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["info"]["report"]["plan_embeddings"]["setting"] == str(chosen)
    assert meta["quant_config"]["quantize_embeddings"] and meta["quant_config"]["overrides"]["embeddings"]["bits"] == 6
    emb_info = meta["layers"]["model.embed_tokens"]
    assert (emb_info["bits"], emb_info["layout"], emb_info["group_size"]) == (6.0, "u6", chosen.group_size)
    assert meta["weights_bytes"] <= mb * 1e6
    assert meta["info"]["report"]["tensor_bytes"] == meta["info"]["report"]["predicted_tensor_bytes"]
