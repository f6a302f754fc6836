"""lowbit pareto --peers: llama.cpp's own types and llmcompressor's GPTQ beside lowbit's points."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit.cli.main import UsageError, build_parser
from lowbit.cli.pareto import sweep_spec
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import compare_logits, evaluate
from lowbit.pareto import SweepSpec, mark_frontier, plan_points, point_key, run_sweep, summary_lines
from lowbit.pareto.report import markdown_report
from lowbit.pareto.spec import text_fingerprints
from lowbit.pareto.sweep import plan_peer_points, sweep_peers

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NO_LLAMA_CPP = "llama_cpp (llama-cpp-python) is not importable"
REAL_PEERS_PYTHON = Path("/opt/peers/bin/python")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer-assets")
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    (root / "sample.txt").write_text(SAMPLE_TEXT)
    return root / "tiny-llama", root / "sample.txt"


def spec_for(assets, **overrides) -> SweepSpec:
    model, text = assets
    settings = dict(
        models=[str(model)], bits=[4], methods=["rtn"], group_sizes=[32], data=str(text), calib=str(text),
        max_tokens=256, seq_len=64,
    )  # fmt: skip
    return SweepSpec(**{**settings, **overrides})


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_cli_generates_peers_option():
    args = build_parser().parse_args(["pareto", "--out", "x", "--peers", "llama.cpp", "llmcompressor"])
    assert sweep_spec(args).peers == ["llama.cpp", "llmcompressor"]
    with pytest.raises(UsageError, match="--peers: invalid choice: 'nonesuch'"):
        build_parser().parse_args(["pareto", "--out", "x", "--peers", "nonesuch"])


def test_peer_points_leave_lowbit_keys_alone(assets):
    plain = spec_for(assets)
    with_peers = spec_for(assets, peers=["llama.cpp"], peer_settings={"llama.cpp": {"types": ["q8_0", "Q4_0"]}})
    fp = text_fingerprints(plain)
    own = plan_points(plain, plain.models[0], fp)
    assert [point_key(p) for p in plan_points(with_peers, plain.models[0], fp)] == [point_key(p) for p in own]
    peers = plan_peer_points(with_peers, own, {"llama.cpp": _llama_plugin(with_peers)})
    assert [(p["method"], p["peer"], p["peer_type"]) for p in peers] == [
        ("peer", "llama.cpp", "Q8_0"),
        ("peer", "llama.cpp", "Q4_0"),
    ]
    assert not {point_key(p) for p in peers} & {point_key(p) for p in own}
    assert all(p["model"] == own[0]["model"] and p["data_sha256"] == own[0]["data_sha256"] for p in peers)


def _llama_plugin(spec):
    from lowbit.peers import make_peer

    return make_peer("llama.cpp", spec.peer_settings.get("llama.cpp"))


def _record(method, total, kl, **extra):
    return {"model": "m", "method": method, "total_bytes": total, "kl_to_reference": kl, "perplexity": 10.0 + kl,
            "top1_agreement": 0.9, "bits_per_weight": 4.0, "bits_per_weight_linear": 4.0, "seconds": 1.0,
            "bits": 4.0, "quantizer": "lsq", "group_size": 32, "key": f"{method}{total}", "tokens": 63,
            **extra}  # fmt: skip


def test_frontier_is_lowbits_own_and_peers_are_compared():
    fp = _record("fp", 1000, 0.0, bits=32.0, quantizer=None, group_size=None, settings={"hp_dtype": "float16"})
    small = _record("rtn", 100, 0.5)
    big = _record("rtn", 300, 0.1)
    beaten = _record("peer", 120, 0.6, peer="llama.cpp", peer_type="Q2_K", bits=None)
    winner = _record("peer", 90, 0.05, peer="llama.cpp", peer_type="Q4_0", bits=None)
    records = mark_frontier([fp, small, big, beaten, winner])
    assert small["frontier"] and big["frontier"]  # a better peer does not push lowbit's points off
    assert not beaten["frontier"] and not winner["frontier"]
    text = "\n".join(summary_lines(records))
    assert "llama.cpp Q2_K" in text and "dominated by lowbit's RTN 4-bit g32 (0.0001 MB, KL 0.5)" in text
    assert "llama.cpp Q4_0" in text and "dominates lowbit's RTN 4-bit g32 (0.0001 MB, KL 0.5)" in text


def test_plot_marks_peer_points(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from lowbit.pareto.plot import plot_pareto

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    fp = _record("fp", 1000, 0.0, bits=32.0, quantizer=None, group_size=None)
    records = mark_frontier(
        [fp, _record("rtn", 100, 0.5), _record("peer", 90, 0.05, peer="llama.cpp", peer_type="Q4_0", bits=None)]
    )
    plot_pareto(records, tmp_path / "p.png")
    ax_kl = kept[0].axes[0]
    assert "llama.cpp (peer)" in [t.get_text() for t in ax_kl.get_legend().get_texts()]
    assert "Q4_0" in [t.get_text() for t in ax_kl.texts]
    frontier = next(line for line in ax_kl.get_lines() if line.get_label() == "Pareto frontier (by KL)")
    assert list(frontier.get_xdata()) == [100 / 1e6]  # the peer point is beside the frontier, not on it


# ---------------------------------------------------------------- llama.cpp end to end


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_llamacpp_peer_end_to_end(assets, tmp_path):
    import gguf

    from lowbit.api import load
    from lowbit.peers.llamacpp import gguf_account, quantize_gguf, write_fp_gguf

    spec = spec_for(assets, peers=["llama.cpp"], peer_settings={"llama.cpp": {"types": ["Q8_0", "Q4_0"]}})
    out = tmp_path / "sweep"
    first = run_sweep(spec, out, progress=False, log=lambda m: None)
    stored = lines(out)
    peers = {r["peer_type"]: r for r in stored if r["method"] == "peer"}
    assert sorted(peers) == ["Q4_0", "Q8_0"] and first["computed"] == 4
    q8, q4 = peers["Q8_0"], peers["Q4_0"]
    assert 0 < q8["kl_to_reference"] < 1e-3 and q8["kl_to_reference"] < q4["kl_to_reference"]
    assert q8["top1_agreement"] > 0.9 and q8["tokens"] == 4 * 63
    assert q8["peer_details"]["gguf_linear_types"] == {"Q8_0": 14}
    assert q8["linear_bytes"] == q8["linear_params"] // 32 * 34  # Q8_0 blocks: 32 int8 + an fp16 scale
    assert q8["total_bytes"] + q8["peer_details"]["gguf_metadata_bytes"] == q8["peer_details"]["gguf_file_bytes"]

    # the same file, made and read independently: its tensor bytes, and llama.cpp's KL on window 0
    model, tokenizer, _ = load(str(assets[0]))
    fp32 = write_fp_gguf(model, tokenizer, tmp_path / "f32.gguf", "tiny")
    q8_path = quantize_gguf(fp32, tmp_path / "q8.gguf", "Q8_0")
    reader = gguf.GGUFReader(q8_path)
    assert q8["total_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert gguf_account(q8_path)["linear_bytes"] == q8["linear_bytes"]
    # llama.cpp's logits of every eval window against the reference's, compared in float64
    from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos
    from lowbit.peers.llamacpp import open_llamacpp, window_logits

    ids = tokenize_windows(tokenizer, get_text(str(assets[1])), 64, max_tokens=256, bos=tokenizer_adds_bos(tokenizer))
    llm = open_llamacpp(q8_path, n_ctx=64, extra_bufts=False)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    kls = [compare_logits(ref[i, :-1], window_logits(llm, w)[:-1])["mean_kl"] for i, w in enumerate(ids.tolist())]
    llm.close()
    assert q8["kl_to_reference"] == pytest.approx(float(np.mean(kls)), rel=0.02)

    md, html = (out / "results.md").read_text(), (out / "report.html").read_text()
    assert "## Peers" in md and "| llama.cpp Q8_0 |" in md and "Q8_0 x14" in md
    assert 'id="peers"' in html and "llama.cpp Q4_0" in html and 'class="peer"' in html
    assert "llama_model_quantize" in md  # how the peer points were made

    again = run_sweep(spec, out, progress=False, log=lambda m: None)
    assert again["computed"] == 0 and again["skipped"] == 4 and lines(out) == stored


# ---------------------------------------------------------------- llmcompressor through another interpreter

# A stand-in for llmcompressor (and the packages its worker imports): "GPTQ" is round-to-nearest on
# a symmetric or asymmetric grid per group; the saved checkpoint holds packed int32 codes and fp16
# scales (and zero points when asymmetric), so the bytes it stores are known.
_STUBS = {
    "llmcompressor/__init__.py": """
        import torch
        __version__ = "0.0-stub"

        def fake_quant(w, args):
            g = w.reshape(w.shape[0], -1, args.group_size)
            if args.symmetric:
                step = g.abs().amax(-1, keepdim=True) / (2 ** (args.num_bits - 1) - 1)
                q = (g / step).round() * step
            else:
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                step = (hi - lo) / (2 ** args.num_bits - 1)
                q = ((g - lo) / step).round() * step + lo
            return q.reshape(w.shape)

        def oneshot(model, processor, dataset, recipe, max_seq_length, num_calibration_samples):
            assert len(dataset["input_ids"]) == num_calibration_samples
            args = recipe.config_groups["group_0"].weights
            linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in recipe.ignore}
            with torch.no_grad():
                for m in linears.values():
                    m.weight.copy_(fake_quant(m.weight, args))

            def save_pretrained(folder, save_compressed):
                from pathlib import Path
                from safetensors.torch import save_file
                tensors = {}
                for n, m in linears.items():
                    rows, cols = m.weight.shape
                    tensors[n + ".weight_packed"] = torch.zeros(rows, cols * args.num_bits // 32, dtype=torch.int32)
                    tensors[n + ".weight_scale"] = torch.zeros(rows, cols // args.group_size, dtype=m.weight.dtype)
                    if not args.symmetric:
                        tensors[n + ".weight_zero_point"] = torch.zeros(rows, cols // args.group_size, dtype=m.weight.dtype)
                tensors["model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
                save_file(tensors, str(Path(folder) / "model.safetensors"))
                Path(folder, "ran-in").write_text("stub")

            model.save_pretrained = save_pretrained
    """,
    "llmcompressor/modifiers/__init__.py": "",
    "llmcompressor/modifiers/quantization/__init__.py": """
        class GPTQModifier:
            def __init__(self, config_groups, ignore):
                self.config_groups, self.ignore = config_groups, ignore
    """,
    "compressed_tensors/__init__.py": "",
    "compressed_tensors/quantization/__init__.py": """
        class QuantizationArgs:
            def __init__(self, num_bits, type, symmetric, strategy, group_size):
                self.num_bits, self.symmetric, self.group_size = num_bits, symmetric, group_size

        class QuantizationScheme:
            def __init__(self, targets, weights):
                self.targets, self.weights = targets, weights
    """,
    "datasets/__init__.py": """
        class Dataset(dict):
            @classmethod
            def from_dict(cls, d):
                return cls(d)
    """,
}


@pytest.fixture
def stub_python(tmp_path):
    """An executable that runs this Python with the llmcompressor stand-in importable."""
    stubs = tmp_path / "stubs"
    for name, text in _STUBS.items():
        if name.startswith("datasets/") and importlib.util.find_spec("datasets") is not None:
            continue
        path = stubs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    python = tmp_path / "peers-python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="$PYTHONPATH:{stubs}" exec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_llmcompressor_peer_in_another_interpreter(assets, tmp_path, stub_python, monkeypatch):
    from lowbit.api import load
    from lowbit.peers import llmcompressor as peer_module

    monkeypatch.setattr(peer_module, "has_llmcompressor", lambda: False)
    monkeypatch.setenv(peer_module.PYTHON_ENV, str(stub_python))
    settings = {"llmcompressor": {"schemes": ["w4g32-sym", "w2g32-asym"], "calib_windows": 3, "calib_seq_len": 64}}
    spec = spec_for(assets, peers=["llmcompressor"], peer_settings=settings)
    out = tmp_path / "sweep"
    run_sweep(spec, out, progress=False, log=lambda m: None)
    stored = lines(out)
    peers = {r["peer_type"]: r for r in stored if r["method"] == "peer"}
    assert sorted(peers) == ["w2g32-asym", "w4g32-sym"]
    w4, w2 = peers["w4g32-sym"], peers["w2g32-asym"]
    assert w4["versions"]["llmcompressor"] == "0.0-stub" and w4["peer_details"]["calib_tokens"] == 3 * 64
    # what the stand-in saved: 4-bit codes + fp16 scales per 32 (2-bit: + fp16 zero points)
    assert w4["bits_per_weight_linear"] == pytest.approx(4 + 16 / 32)
    assert w2["bits_per_weight_linear"] == pytest.approx(2 + 32 / 32)
    assert w4["total_bytes"] == w4["linear_bytes"] + w4["other_bytes"] and w4["other_bytes"] > 0

    # scored by lowbit's evaluator on the sweep's windows: the stand-in's weights, evaluated here
    stub_quant = _import_stub_quant(stub_python.parent / "stubs")
    model, _, _ = load(str(assets[0]))
    reference = load(str(assets[0]))[0]
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(stub_quant(m.weight, _Args(4, True, 32)))
    from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos

    tokenizer = load(str(assets[0]))[1]
    windows = tokenize_windows(
        tokenizer, get_text(str(assets[1])), 64, max_tokens=256, bos=tokenizer_adds_bos(tokenizer)
    )
    expected = evaluate(model, windows, reference=reference, progress=False)
    assert w4["kl_to_reference"] == pytest.approx(expected["kl_to_reference"], rel=1e-6)
    assert w4["kl_to_reference"] < w2["kl_to_reference"]
    assert "llmcompressor w2g32-asym" in (out / "results.md").read_text()


class _Args:
    def __init__(self, num_bits, symmetric, group_size):
        self.num_bits, self.symmetric, self.group_size = num_bits, symmetric, group_size


def _import_stub_quant(stubs: Path):
    spec = importlib.util.spec_from_file_location("_stub_llmc", stubs / "llmcompressor" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fake_quant


def test_llmcompressor_needs_an_interpreter(assets, monkeypatch):
    from lowbit.peers import llmcompressor as peer_module

    monkeypatch.setattr(peer_module, "has_llmcompressor", lambda: False)
    monkeypatch.delenv(peer_module.PYTHON_ENV, raising=False)
    with pytest.raises(LowbitError, match="LOWBIT_PEERS_PYTHON"):
        sweep_peers(spec_for(assets, peers=["llmcompressor"]))
    with pytest.raises(LowbitError, match="w4g64-sym"):
        sweep_peers(spec_for(assets, peers=["llmcompressor"], peer_settings={"llmcompressor": {"schemes": ["q4"]}}))


@pytest.mark.skipif(not REAL_PEERS_PYTHON.exists(), reason="no interpreter with llmcompressor at /opt/peers")
def test_real_llmcompressor_on_a_tiny_model(assets, tmp_path, monkeypatch):
    from lowbit.peers import llmcompressor as peer_module

    monkeypatch.setenv(peer_module.PYTHON_ENV, str(REAL_PEERS_PYTHON))
    monkeypatch.setattr(peer_module, "has_llmcompressor", lambda: False)
    settings = {"llmcompressor": {"schemes": ["w4g32-asym"], "calib_windows": 4, "calib_seq_len": 64}}
    out = tmp_path / "sweep"
    run_sweep(
        spec_for(assets, peers=["llmcompressor"], peer_settings=settings), out, progress=False, log=lambda m: None
    )
    (peer,) = [r for r in lines(out) if r["method"] == "peer"]
    assert 0 < peer["kl_to_reference"] < 0.05
    # int4 codes packed in int32, fp16 scales and int4-packed zero points per group of 32
    assert 4 < peer["bits_per_weight_linear"] < 4 + 32 / 32
    assert "llmcompressor" in peer["versions"] and os.path.isdir(out)


def test_markdown_without_peers_has_no_peer_section(assets):
    fp = _record("fp", 1000, 0.0, bits=32.0, quantizer=None, group_size=None, tokens=63, windows=1, seq_len=64,
                 eval_tokens_sha256="x")  # fmt: skip
    md = markdown_report(mark_frontier([fp, _record("rtn", 100, 0.5)]), spec_for(assets))
    assert "Peers" not in md and "llama.cpp" not in md
