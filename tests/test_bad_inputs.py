"""Every CLI command against a table of bad inputs: one line ``lowbit: error: ...`` naming the
problem, the right exit code, no traceback, and nothing at ``--out`` created or changed (issue 14).

The rows run ``lowbit.cli.main(argv)`` in-process on a tiny model built once for the module; a few
checks (Ctrl-C during import, the entry point) run a subprocess. ``out_row`` rows cover output
safety (``--out`` protection, manifest checks).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit.cli.main import main


def out_row(name: str, argv: list[str], needle: str):
    """A row of output safety (``--out`` protection, manifests): exit 2 and the needle."""
    return pytest.param(name, argv, 2, needle, id=name)


# ---------------------------------------------------------------------------------------------- inputs


def _write_inputs(root: Path) -> dict[str, Path]:
    """The module's inputs: a tiny model, a quantized copy, texts, configs and broken folders."""
    from lowbit.api import load, quantize
    from lowbit.eval.models import reference_identity
    from lowbit.quant.surgery import QuantConfig
    from lowbit.store.folder import save_quantized

    tokenizer = tiny_tokenizer()
    tiny = root / "tiny"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    model, tok, _ = load(str(tiny))
    quantize(model, QuantConfig(bits=4, group_size=32), "rtn", progress=False)
    q4 = root / "q4"
    save_quantized(model, tok, q4, info={**reference_identity(str(tiny)), "method": "rtn"})
    p = {"T": tiny, "Q": q4}
    files = {
        "S": SAMPLE_TEXT,
        "EMPTY": "  \n\t",
        "NUL": "\x00\x00 some text \x00",
        "SHORT": "just a few words",
        "LIST": "[1, 2]",
        "NAN": '{"bits": NaN}',
        "UNKNOWN": '{"bitz": 4}',
        "BADGROUP": '{"bits": 4, "group_size": "abc"}',
        "BADBITS": '{"bits": ["four"]}',
        "SEQABC": '{"seq_len": "abc"}',
        "SEQFLOAT": '{"seq_len": 12.5}',
        "NOTJSON": "{bits: 4",
    }
    for name, text in files.items():
        p[name] = root / f"{name.lower()}.txt"
        p[name].write_text(text)
    p["LATIN1"] = root / "latin1.txt"
    p["LATIN1"].write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    for name, drop in (("NOTOK", "tokenizer*"), ("NOCONF", "config.json")):
        p[name] = shutil.copytree(tiny, root / name.lower())
        for f in p[name].glob(drop):
            f.unlink()
    p["QNOTOK"] = shutil.copytree(q4, root / "qnotok")
    for f in p["QNOTOK"].glob("tokenizer*"):
        f.unlink()
    for name, meta in (("QLIST", "[1, 2]"), ("QKEYS", '{"format": 1}')):
        p[name] = shutil.copytree(q4, root / name.lower())
        (p[name] / "lowbit.json").write_text(meta)
    p["QNOMETA"] = shutil.copytree(q4, root / "qnometa")
    (p["QNOMETA"] / "lowbit.json").unlink()
    inf_model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        inf_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    p["INF"] = root / "inf"
    inf_model.save_pretrained(p["INF"])
    tokenizer.save_pretrained(p["INF"])
    p["DIR"] = root / "a-folder"
    p["DIR"].mkdir()
    p["MISSING"] = root / "missing"
    return p


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _write_inputs(tmp_path_factory.mktemp("inputs"))


def _tree(path: Path) -> dict | None:
    """Every file under ``path`` (or ``path`` itself) with its size and SHA-256; None if absent."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# ---------------------------------------------------------------------------------------------- the table
# (argv with placeholders, expected exit code, a substring of the error line); {O} is a fresh path
# under the row's folder, {K} a folder holding someone's file, {C} a fresh copy of the tiny model.

T, Q, S, OUT_DIR = "{T}", "{Q}", "{S}", "{O}"
QUANT = ["quantize", "--model", T, "--out", OUT_DIR]
EVAL = ["eval", "--model", Q, "--data", S, "--seq-len", "32", "--json"]
TRAIN = ["train", "--model", T, "--bits", "4", "--steps", "2", "--data", S, "--seq-len", "32",
         "--out", OUT_DIR, "--json"]  # fmt: skip
PARETO = ["pareto", "--model", T, "--bits", "4", "--methods", "rtn", "--data", S, "--seq-len", "32",
          "--out", OUT_DIR, "--json"]  # fmt: skip
EXPORT = ["export", Q, "--out", "{O}.gguf"]
GEN = ["generate", "--model", Q, "--prompt", "hello", "--max-new-tokens", "2", "--json"]
BENCH = ["bench", "--model", Q, "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1", "--json"]



def drop(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


ROWS = [
    # the command line itself (argparse: one line, not the usage block)
    ("no-command", [], 2, "required: command"),
    ("unknown-command", ["bogus"], 2, "invalid choice: 'bogus'"),
    ("threads-negative", ["--threads", "-1", "info", Q], 2, "--threads"),
    ("threads-zero", ["--threads", "0", "info", Q], 2, "--threads"),
    ("threads-not-a-number", ["--threads", "x", "info", Q], 2, "--threads"),
    ("unknown-flag", [*QUANT, "--bits", "4", "--bogus"], 2, "unrecognized arguments: --bogus"),
    # quantize
    ("quantize-no-out", ["quantize", "--model", T, "--bits", "4"], 2, "required: --out"),
    ("quantize-no-bits", QUANT, 2, "--bits is required"),
    ("bits-5", [*QUANT, "--bits", "5"], 2, "unsupported bit-width"),
    ("bits-7", [*QUANT, "--bits", "7"], 2, "choose one of 1, 1.58 (or 'ternary'), 2, 3, 4, 6, 8"),
    ("override-bits-5", [*QUANT, "--bits", "4", "--override", "embeddings=5:64"], 2, "unsupported bit-width"),
    ("bits-1.5", [*QUANT, "--bits", "1.5"], 2, "write 1.58 or 'ternary'"),
    ("bits-1.6", [*QUANT, "--bits", "1.6"], 2, "write 1.58 or 'ternary'"),
    ("bits-word", [*QUANT, "--bits", "sixteen"], 2, "unsupported bit-width"),
    ("group-size-0", [*QUANT, "--bits", "4", "--group-size", "0"], 2, "--group-size: group size must be a positive"),
    ("group-size-negative", [*QUANT, "--bits", "4", "--group-size", "-3"], 2, "--group-size"),
    ("group-size-word", [*QUANT, "--bits", "4", "--group-size", "big"], 2, "--group-size"),
    ("group-size-too-large", [*QUANT, "--bits", "4", "--group-size", "4096"], 2, "group size 4096"),
    ("calib-under-rtn", [*QUANT, "--bits", "4", "--calib", S], 2, "--calib only applies to --method gptq"),
    ("calib-tokens-under-rtn", [*QUANT, "--bits", "4", "--calib-tokens", "64"], 2, "--calib-tokens only applies"),
    ("calib-tokens-0", [*QUANT, "--bits", "4", "--method", "gptq", "--calib-tokens", "0"], 2, "--calib-tokens"),
    ("gptq-seq-len-0", [*QUANT, "--bits", "4", "--method", "gptq", "--seq-len", "0"], 2, "--seq-len"),
    ("gptq-damp-nan", [*QUANT, "--bits", "4", "--method", "gptq", "--damp", "nan"], 2, "--damp: expected a finite"),
    ("method-unknown", [*QUANT, "--bits", "4", "--method", "awq"], 2, "--method: invalid choice"),
    ("scale-search-unknown", [*QUANT, "--bits", "4", "--scale-search", "max"], 2, "--scale-search"),
    ("override-no-equals", [*QUANT, "--bits", "4", "--override", "layers"], 2, "override must look like"),
    ("override-bits-1.5", [*QUANT, "--bits", "4", "--override", "*=1.5"], 2, "write 1.58"),
    ("override-group-0", [*QUANT, "--bits", "4", "--override", "*=4:0"], 2, "group size must be a positive"),
    ("config-list", [*QUANT, "--config", "{LIST}"], 2, "holds a JSON list, not an object"),
    ("config-nan", [*QUANT, "--config", "{NAN}"], 2, "NaN is not a finite number"),
    ("config-not-json", [*QUANT, "--config", "{NOTJSON}"], 2, "cannot read config"),
    ("config-missing", [*QUANT, "--config", "{MISSING}"], 2, "cannot read config"),
    ("config-unknown-key", [*QUANT, "--config", "{UNKNOWN}"], 2, "unknown quantization setting"),
    ("config-bad-group", [*QUANT, "--config", "{BADGROUP}"], 2, "'group_size': group size must be"),
    ("model-missing", ["quantize", "--model", "{MISSING}", "--bits", "4", "--out", OUT_DIR], 2, "not found"),
    ("model-no-config", ["quantize", "--model", "{NOCONF}", "--bits", "4", "--out", OUT_DIR], 2, "has no config.json"),
    ("model-no-tokenizer", ["quantize", "--model", "{NOTOK}", "--bits", "4", "--out", OUT_DIR], 2, "tokenizer"),
    ("model-is-a-text-file", ["quantize", "--model", S, "--bits", "4", "--out", OUT_DIR], 2, "not a .gguf file"),
    ("model-already-quantized", ["quantize", "--model", Q, "--bits", "4", "--out", OUT_DIR], 2, "already quantized"),
    out_row("out-not-empty", ["quantize", "--model", T, "--bits", "4", "--out", "{K}"], "--out"),
    out_row("out-is-model", ["quantize", "--model", "{C}", "--bits", "4", "--out", "{C}"], "--out"),
    out_row("out-inside-model", ["quantize", "--model", "{C}", "--bits", "4", "--out", "{C}/q"], "--out"),
    out_row("out-is-a-file", ["quantize", "--model", T, "--bits", "4", "--out", "{K}/a.txt"], "--out"),
    # eval / info
    ("eval-batch-size-0", [*EVAL, "--batch-size", "0"], 2, "--batch-size: expected a positive integer"),
    ("eval-batch-size-negative", [*EVAL, "--batch-size", "-1"], 2, "--batch-size"),
    ("eval-seq-len-0", [*EVAL, "--seq-len", "0"], 2, "--seq-len"),
    ("eval-seq-len-1", [*EVAL, "--seq-len", "1"], 2, "at least 2 tokens"),
    ("eval-seq-len-beyond-positions", [*EVAL, "--seq-len", "4096"], 2, "--seq-len 4096 is longer than the model's 256"),
    ("eval-max-tokens-negative", [*EVAL, "--max-tokens", "-5"], 2, "--max-tokens"),
    ("eval-max-tokens-under-a-window", [*EVAL, "--max-tokens", "10"], 2, "tokens"),
    ("eval-text-empty", [*EVAL, "--data", "{EMPTY}"], 2, "is empty"),
    ("eval-text-nul-bytes", [*EVAL, "--data", "{NUL}"], 2, "NUL bytes"),
    ("eval-text-not-utf8", [*EVAL, "--data", "{LATIN1}"], 2, "not valid UTF-8"),
    ("eval-text-missing", [*EVAL, "--data", "{MISSING}"], 2, "not found"),
    ("eval-text-is-a-folder", [*EVAL, "--data", "{DIR}"], 2, "not a file"),
    ("eval-text-too-short", [*EVAL, "--data", "{SHORT}"], 2, "tokens"),
    ("eval-nan-model", ["eval", "--model", "{INF}", "--data", S, "--seq-len", "32", "--json"], 2, "non-finite"),
    ("eval-nan-reference", [*EVAL, "--reference", "{INF}"], 2, "non-finite KL"),
    ("eval-reference-missing", [*EVAL, "--reference", "{MISSING}"], 2, "not found"),
    ("eval-no-tokenizer", ["eval", "--model", "{QNOTOK}", "--data", S, "--seq-len", "32"], 2, "tokenizer.json is missing"),
    out_row("eval-lowbit-json-list", ["eval", "--model", "{QLIST}", "--data", S, "--seq-len", "32"], "lowbit.json"),
    out_row("eval-without-manifest", ["eval", "--model", "{QNOMETA}", "--data", S, "--seq-len", "32"], "lowbit.json"),
    ("info-lowbit-json-lacks-keys", ["info", "{QKEYS}"], 2, "qkeys"),
    ("info-missing", ["info", "{MISSING}"], 2, "not found"),
    # train
    ("train-no-steps", ["train", "--model", T, "--bits", "4", "--data", S, "--out", OUT_DIR], 2, "required: --steps"),
    ("train-steps-0", [*TRAIN, "--steps", "0"], 2, "--steps: expected a positive integer"),
    ("train-lr-nan", [*TRAIN, "--lr", "nan"], 2, "--lr: expected a finite number"),
    ("train-lr-inf", [*TRAIN, "--lr", "inf"], 2, "--lr: expected a finite number"),
    ("train-lr-negative", [*TRAIN, "--lr", "-0.001"], 2, "lr must be > 0"),
    ("train-grad-clip-nan", [*TRAIN, "--grad-clip", "nan"], 2, "--grad-clip"),
    ("train-kl-weight", [*TRAIN, "--loss", "mix", "--kl-weight", "2"], 2, "kl-weight"),
    ("train-warmup", [*TRAIN, "--warmup", "5"], 2, "warmup"),
    ("train-bits-1.5", [*TRAIN, "--bits", "1.5"], 2, "write 1.58"),
    ("train-group-size-0", [*TRAIN, "--group-size", "0"], 2, "--group-size"),
    ("train-calib-under-rtn", [*TRAIN, "--calib", S], 2, "--calib only applies to --init gptq"),
    ("train-no-data", drop(TRAIN, "--data"), 2, "give training data"),
    ("train-two-data", [*TRAIN, "--data-free", "64"], 2, "not both"),
    ("train-seq-len-1", [*TRAIN, "--seq-len", "1"], 2, "seq-len must be at least 2"),
    ("train-seq-len-beyond-positions", [*TRAIN, "--seq-len", "4096"], 2, "--seq-len 4096 is longer"),
    ("train-init-unknown", [*TRAIN, "--init", "awq"], 2, "--init must be rtn, gptq"),
    ("train-eval-tokens-0", [*TRAIN, "--eval-tokens", "0"], 2, "--eval-tokens"),
    ("train-text-nul-bytes", [*TRAIN, "--data", "{NUL}"], 2, "NUL bytes"),
    ("train-out-not-empty", [*drop(TRAIN, "--out"), "--out", "{K}"], 2, "choose an empty or new folder"),
    # pareto
    ("pareto-bits-1.6", [*PARETO, "--bits", "1.6"], 2, "--bits: unsupported bit-width '1.6'"),
    ("pareto-bits-5", [*PARETO, "--bits", "5"], 2, "--bits"),
    ("pareto-group-sizes-0", [*PARETO, "--group-sizes", "0"], 2, "--group-sizes"),
    ("pareto-calib-without-gptq", [*PARETO, "--calib", S], 2, "--calib only applies to GPTQ points"),
    ("pareto-calib-tokens-0", [*PARETO, "--calib-tokens", "0"], 2, "--calib-tokens"),
    ("pareto-seq-len-1", [*PARETO, "--seq-len", "1"], 2, "--seq-len"),
    ("pareto-batch-size-0", [*PARETO, "--batch-size", "0"], 2, "--batch-size"),
    ("pareto-max-tokens-negative", [*PARETO, "--max-tokens", "-1"], 2, "--max-tokens"),
    ("pareto-method-unknown", [*PARETO, "--methods", "awq"], 2, "--methods: invalid choice"),
    ("pareto-config-list", [*PARETO, "--config", "{LIST}"], 2, "holds a JSON list"),
    ("pareto-config-bad-bits", [*drop(PARETO, "--bits"), "--config", "{BADBITS}"], 2, "unsupported bit-width"),
    ("pareto-config-seq-len-word", [*drop(PARETO, "--seq-len"), "--config", "{SEQABC}"], 2, "'seq_len'"),
    ("pareto-config-seq-len-fraction", [*drop(PARETO, "--seq-len"), "--config", "{SEQFLOAT}"], 2, "finite integer"),
    ("pareto-model-missing", [*drop(PARETO, "--model"), "--model", "{MISSING}"], 2, "not found"),
    ("pareto-text-missing", [*PARETO, "--data", "{MISSING}"], 2, "not found"),
    out_row("pareto-out-is-a-file", [*drop(PARETO, "--out"), "--out", "{K}/a.txt"], "a.txt"),
    # export
    ("export-not-quantized", ["export", T, "--out", "{O}.gguf"], 2, "not a lowbit quantized folder"),
    ("export-missing", ["export", "{MISSING}", "--out", "{O}.gguf"], 2, "not a folder"),
    ("export-fallback-unknown", [*EXPORT, "--fallback", "q2_k"], 2, "--fallback: invalid choice"),
    ("export-format-unknown", [*EXPORT, "--format", "onnx"], 2, "--format: invalid choice"),
    ("export-no-out", ["export", Q], 2, "required: --out"),
    out_row("export-out-exists", ["export", Q, "--out", "{K}/a.txt"], "--out"),
    # generate / bench
    ("generate-max-new-tokens-negative", [*GEN, "--max-new-tokens", "-1"], 2, "--max-new-tokens: expected a positive"),
    ("generate-max-new-tokens-0", [*GEN, "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("generate-no-prompt", ["generate", "--model", Q], 2, "required: --prompt"),
    ("generate-empty-prompt", [*drop(GEN, "--prompt"), "--prompt", ""], 2, "the prompt is empty"),
    ("generate-beyond-positions", [*GEN, "--max-new-tokens", "1000"], 2, "more than the model's 256 positions"),
    ("generate-not-quantized", ["generate", "--model", T, "--prompt", "hi"], 2, "lowbit.json"),
    ("generate-missing", ["generate", "--model", "{MISSING}", "--prompt", "hi"], 2, "missing"),
    ("generate-no-tokenizer", ["generate", "--model", "{QNOTOK}", "--prompt", "hi"], 2, "tokenizer.json is missing"),
    ("generate-sample-lowbit-loop", [*GEN, "--sample", "--engine", "lowbit"], 2, "greedy only"),
    ("generate-engine-unknown", [*GEN, "--engine", "vllm"], 2, "--engine: invalid choice"),
    ("bench-repeats-0", [*BENCH, "--repeats", "0"], 2, "--repeats: expected a positive integer"),
    ("bench-prompt-tokens-0", [*BENCH, "--prompt-tokens", "0"], 2, "--prompt-tokens"),
    ("bench-new-tokens-negative", [*BENCH, "--new-tokens", "-2"], 2, "--new-tokens"),
    ("bench-activations-unknown", [*BENCH, "--activations", "int4"], 2, "--activations: invalid choice: 'int4'"),
    ("bench-missing", ["bench", "--model", "{MISSING}"], 2, "missing"),
    ("bench-beyond-positions", [*BENCH, "--prompt-tokens", "300"], 2, "more than the model's 256 positions"),
]


def _param(row):
    return row if hasattr(row, "values") else pytest.param(*row, id=row[0])


def _fill(argv: list[str], places: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in places.items()}) for a in argv]


def _error_line(err: str) -> str:
    """The one line of a failed command's stderr (progress bars are drawn with carriage returns)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name,argv,code,needle", [_param(r) for r in ROWS])
def test_bad_input(name, argv, code, needle, inputs, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "a.txt").write_text("someone's file\n")
    places = {**inputs, "O": tmp_path / "out", "K": keep}
    if "{C}" in " ".join(argv):
        places["C"] = shutil.copytree(inputs["T"], tmp_path / "model-copy")
    watched = [places["O"], Path(f"{places['O']}.gguf"), keep, inputs["T"], inputs["Q"], places.get("C", keep)]
    before = {str(p): _tree(p) for p in watched}
    capsys.readouterr()
    result = main(_fill(argv, places))
    out, err = capsys.readouterr()
    line = _error_line(err)
    assert result == code, err
    assert line.startswith("lowbit: error: "), line
    assert needle in line, line
    assert {str(p): _tree(p) for p in watched} == before  # nothing at --out (or in the inputs) changed


# ---------------------------------------------------------------------------------------------- beyond the table


def test_nan_training_stops_with_the_last_finite_checkpoint(inputs, tmp_path, capsys):
    """A diverging run (lr 1e30) stops on the first NaN/inf with one line; the checkpoint left is
    the last one whose weights are all finite, and no model is published."""
    out = tmp_path / "run"
    argv = _fill([*TRAIN, "--lr", "1e30", "--save-every", "1", "--steps", "4"], {**inputs, "O": out})
    code = main(argv)
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and "training stopped" in line and "lower --lr" in line, line
    assert "checkpoint" in line
    assert not (out / "model.safetensors").exists() and not (out / "lowbit.json").exists()
    if (out / "checkpoint.pt").exists():
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert f"step {state['step']})" in line
        assert all(torch.isfinite(t).all() for t in state["model"].values() if torch.is_tensor(t))
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]  # strict JSON: no NaN
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_json_output_is_strict_json(inputs, capsys):
    """--json prints JSON that a strict parser reads (no bare NaN / Infinity)."""
    code = main(_fill(EVAL, inputs))
    out, err = capsys.readouterr()
    assert code == 0, err

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    result = json.loads(out, parse_constant=refuse)
    assert math.isfinite(result["perplexity"]) and result["tokens"] > 0


def test_a_non_finite_result_is_refused(monkeypatch, capsys):
    """A NaN that slipped into a result fails the command instead of printing NaN."""
    import lowbit.cli.main as cli

    monkeypatch.setattr(cli, "cmd_info", lambda args: {"model": "m", "perplexity": float("nan")})
    code = main(["info", "m", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert "non-finite" in _error_line(err) and "perplexity = nan" in err


def test_unexpected_exception_is_one_line_with_exit_1(monkeypatch, capsys):
    import lowbit.cli.main as cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_info", broken)
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    code = main(["info", "m"])
    line = _error_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith("lowbit: error: internal error: RuntimeError: boom second line") and "LOWBIT_DEBUG=1" in line
    monkeypatch.setenv("LOWBIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["info", "m"])


def test_parse_time_checks(monkeypatch):
    """The parse helpers behind the flags, and a JSON config's single value read as a list."""
    import argparse

    from lowbit.errors import LowbitError
    from lowbit.options import parse_count, parse_finite_float, parse_group_size
    from lowbit.pareto import SweepSpec
    from lowbit.quant.quantizers import parse_bits_option

    assert parse_group_size("channel") is None and parse_group_size("64") == 64
    assert parse_bits_option("ternary") == parse_bits_option("1.58") == 1.58
    assert parse_count("0") == 0 and parse_finite_float("1e-3") == 1e-3
    for parse, text in [(parse_group_size, "0"), (parse_bits_option, "1.6"), (parse_count, "-1"),
                        (parse_finite_float, "inf"), (parse_finite_float, "nan")]:  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    spec = SweepSpec.from_dict({"bits": 4, "methods": "rtn", "group_sizes": "channel", "models": "m"})
    assert (spec.bits, spec.methods, spec.group_sizes, spec.models) == ([4.0], ["rtn"], [None], ["m"])
    with pytest.raises(LowbitError, match="'channel'"):
        SweepSpec.from_dict({"group_sizes": [0]})


@pytest.mark.parametrize("command,target", [("quantize", "lowbit.api.quantize_to_dir"),
                                            ("export", "lowbit.gguf.export_gguf")])  # fmt: skip
def test_overwrite_is_passed_to_the_library(command, target, monkeypatch, inputs, tmp_path, capsys):
    """--overwrite reaches the library call as overwrite=True; without it the call gets no
    overwrite argument (the library's default: refuse to replace)."""
    calls = []
    monkeypatch.setattr(target, lambda *a, **kw: calls.append(kw) or {"ok": 1})
    argv = ["export", str(inputs["Q"])]
    if command == "quantize":
        argv = ["quantize", "--model", str(inputs["T"]), "--bits", "4"]
    for extra in ([], ["--overwrite"]):
        assert main([*argv, "--out", str(tmp_path / "o"), "--json", *extra]) == 0, capsys.readouterr().err
    assert calls[0].get("overwrite", False) is False and calls[1]["overwrite"] is True


def test_overwrite_replaces_only_with_the_flag(inputs, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(inputs["T"]), "--bits", "4", "--out", str(out), "--json"]
    assert main(argv) == 0
    first = _tree(out)
    assert main(argv) == 2 and "--overwrite" in _error_line(capsys.readouterr().err)
    assert _tree(out) == first
    assert main([*argv[:-1], "--bits", "2", "--overwrite", "--json"]) == 0
    assert json.loads((out / "lowbit.json").read_text())["quant_config"]["bits"] == 2


# ---------------------------------------------------------------------------------------------- subprocesses


def _env():
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_sigint_during_import_is_one_line(tmp_path):
    """Ctrl-C while lowbit imports torch: ``lowbit: interrupted`` and exit code 130. The signal is
    sent by an import hook the moment torch starts importing, so the timing is exact."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        # Python's own Ctrl-C handler, whatever disposition the test process passed down (a parent that
        # ignores SIGINT makes a child start with it ignored, and then the kill below would do nothing)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        class Hook:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.SIGINT)
                return None
        sys.meta_path.insert(0, Hook())
        from lowbit.cli.main import main
        sys.exit(main(["info", sys.argv[1]]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "lowbit: interrupted"


def test_entry_point_usage_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "--batch-size", "0"], capture_output=True,
                          text=True, env=_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "lowbit: error: eval: argument --batch-size: expected a positive integer, got '0' (see lowbit eval --help)"
    ]
