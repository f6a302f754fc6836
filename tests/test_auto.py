"""``--method auto``: rotation where it applies, the byte-budget plan with GPTQ, Block-AP in the time left."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit.budget.auto import Auto
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import size_account
from lowbit.quant.surgery import QuantConfig


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("auto") / "calib.txt"
    path.write_text(SAMPLE_TEXT * 3)
    return str(path)


def _auto(calib, **kw):
    return Auto(**{"budget_bpw": 3.0, "calib": calib, "calib_tokens": 1024, "blockap_tokens": 1024, "seq_len": 64, **kw})


def test_without_time_budget_auto_is_rotation_then_plan_and_gptq(calib):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    report = _auto(calib).apply(model, QuantConfig(bits=4), tokenizer=tok, progress=False)
    assert [s["stage"] for s in report["stages"]] == ["rotation", "budget+gptq"]
    assert report["skipped"] == {"blockap": "no --time-budget given", "e2e": "no --time-budget given"}
    assert model.lowbit_rotation["kind"] == "randomized-hadamard" and model.lowbit_config.rotate
    assert size_account(model)["bits_per_weight_linear"] <= 3.0
    assert report["plan"]["bits_per_weight_linear"] <= 3.0


def test_with_time_left_block_ap_runs_and_never_worsens_a_block(calib):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    report = _auto(calib, time_budget=3600.0, rotation="no", e2e_steps=6).apply(model, QuantConfig(bits=4), tok,
                                                                                 progress=False)  # fmt: skip
    assert [s["stage"] for s in report["stages"]] == ["budget+gptq", "blockap", "e2e"]
    assert report["stages"][2]["steps"] == 6 and report["stages"][2]["tokens"] == 6 * 8 * 64
    assert report["skipped"] == {"rotation": "rotation no"}
    blocks = report["stages"][1]["blocks"]
    assert len(blocks) == 2 and all(b["mse_final"] <= b["mse_initial"] for b in blocks)


def test_too_little_time_skips_block_ap_and_unsupported_models_skip_rotation(calib):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(cfg).eval()
    report = _auto(calib, time_budget=1.0).apply(copy.deepcopy(gemma), QuantConfig(bits=4), tok, progress=False)
    assert "sandwich norms" in report["skipped"]["rotation"]
    assert "s left of the time budget" in report["skipped"]["blockap"]
    assert "s left of the time budget" in report["skipped"]["e2e"]
    with pytest.raises(LowbitError, match="sandwich norms"):
        _auto(calib, rotation="yes").apply(copy.deepcopy(gemma), QuantConfig(bits=4), tok, progress=False)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"budget_bpw": None}, "--budget-bpw or --budget-mb"), ({"rotation": "maybe"}, "rotation 'maybe'"),
     ({"time_budget": -1.0}, "time budget")],  # fmt: skip
)
def test_bad_settings(settings, message):
    with pytest.raises(LowbitError, match=message):
        Auto(**{"budget_bpw": 3.0, **settings})


def test_cli_budget_defaults_to_auto_and_records_the_stages(tmp_path, tiny_model_dir, calib, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_model_dir), "--budget-bpw", "3", "--calib", calib,
                 "--calib-tokens", "1024", "--seq-len", "64", "--out", str(out), "--json"]) == 0  # fmt: skip
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["info"]["method"] == "auto" and meta["quant_config"]["rotate"] is True
    assert [s["stage"] for s in meta["info"]["report"]["stages"]] == ["rotation", "budget+gptq"]
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--time-budget", "10m",
                 "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "--time-budget only applies to --method" in capsys.readouterr().err
