"""Streaming quantization (lowbit.ptq.streaming): the same folder as the in-memory path, bit for bit, one
block in memory at a time, atomic output, clear refusals; the mapped safetensors reader and writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit.api import quantize_to_dir
from lowbit.budget import streamed
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.ptq import source, streaming
from lowbit.ptq.methods import make_method
from lowbit.ptq.streaming import stream_quantize_to_dir
from lowbit.quant.surgery import QuantConfig
from lowbit.store.folder import is_quantized_dir, open_folder
from lowbit.store.stfile import Checkpoint, MappedSafetensors, SafetensorsWriter

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _bf16_model(root: Path, hidden=64, layers=2, tied=True, shard=None) -> Path:
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden=hidden, layers=layers, tied=tied).to(torch.bfloat16)
    path = root / "model"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(path)
    return path


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE_TEXT)
    return {"calib": str(path), "calib_tokens": 256, "seq_len": 32}


def assert_same_folder(a: Path, b: Path) -> None:
    """Every stored tensor equal (dtype and values), the same layers, quant config, config.json and file names."""
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    ma, mb = (json.loads((p / "lowbit.json").read_text()) for p in (a, b))
    assert ma["layers"] == mb["layers"] and list(ma["layers"]) == list(mb["layers"])
    assert ma["quant_config"] == mb["quant_config"]
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    open_folder(b)  # the manifest holds (sizes and SHA-256 of every file)


CASES = {
    "rtn-4bit-g32-sharded": ("rtn", dict(bits=4, group_size=32), dict(shard="60KB")),
    "rtn-2bit-mixed-emb-untied": (
        "rtn", dict(bits=2, overrides={"model.layers.1.*": {"bits": 4, "group_size": 16}}, quantize_embeddings=True,
                    exclude=["*.k_proj"]), dict(tied=False)),
    "gptq-4bit-g128-sharded": ("gptq", dict(bits=4, group_size=128), dict(hidden=128, shard="150KB")),
    "gptq-2bit-g32-mixed-emb-memmap": (
        "gptq", dict(bits=2, group_size=32, overrides={"*.mlp.down_proj": {"bits": 4}}, quantize_embeddings=True),
        dict(tied=False, limit=0)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_folder_is_bit_exact(tmp_path, calib, case):
    method, cfg, opts = CASES[case]
    limit = opts.pop("limit", streaming.HIDDEN_IN_MEMORY_BYTES)
    model = _bf16_model(tmp_path, **opts)
    if "shard" in opts:
        assert (model / "model.safetensors.index.json").is_file() and len(list(model.glob("*.safetensors"))) > 1
    settings = calib if method == "gptq" else {}
    ref = quantize_to_dir(str(model), str(tmp_path / "mem"), QuantConfig(**cfg), method, progress=False, stream=False,
                          **settings)
    out = stream_quantize_to_dir(str(model), str(tmp_path / "st"), QuantConfig(**cfg), method, progress=False,
                                 hidden_limit_bytes=limit, **settings)  # fmt: skip
    assert_same_folder(tmp_path / "mem", tmp_path / "st")
    skip = ("quantize_seconds", "out", "streamed")
    assert {k: v for k, v in out.items() if k not in skip} == {k: v for k, v in ref.items() if k not in skip}
    assert out["streamed"] is True


def test_cli_stream_flag_and_refusals(tmp_path, calib, capsys):
    model = _bf16_model(tmp_path, shard="60KB")
    base = ["quantize", "--model", str(model), "--bits", "4", "--group-size", "32", "--json"]
    assert main(base + ["--out", str(tmp_path / "a"), "--no-stream"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--stream"]) == 0
    capsys.readouterr()
    assert_same_folder(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "lowbit.json").read_text())["info"]["streamed"] is True
    for extra, needle in [
        (["--method", "budget", "--budget-mb", "1"], "--stream plans --budget-bpw, not --budget-mb"),
        (["--budget-bpw", "3"], "not auto"),
        (["--method", "blockap"], "not blockap"),
        (["--rotate"], "cannot --rotate"),
    ]:
        assert main(base + ["--out", str(tmp_path / "c"), "--stream"] + extra) == 2
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "c").exists()


def test_streaming_is_the_default_where_it_writes_the_same_folder(tmp_path, calib):
    """``lowbit quantize`` (and ``quantize_to_dir``) stream by default for RTN, GPTQ and a bits-per-weight
    budget; --no-stream loads the model whole and writes the same tensors; what cannot stream
    (a rotation, the auto pipeline, a file budget, torchrun) loads the model whole without being asked."""
    model = _bf16_model(tmp_path)
    base = ["quantize", "--model", str(model), "--bits", "4", "--group-size", "32"]
    assert main(base + ["--out", str(tmp_path / "s")]) == 0
    assert main(base + ["--out", str(tmp_path / "m"), "--no-stream"]) == 0
    streamed_info = json.loads((tmp_path / "s" / "lowbit.json").read_text())["info"]
    whole_info = json.loads((tmp_path / "m" / "lowbit.json").read_text())["info"]
    assert streamed_info["streamed"] is True and "streamed" not in whole_info
    a, b = open_folder(tmp_path / "s").tensors, open_folder(tmp_path / "m").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rtn, gptq = make_method("rtn"), make_method("gptq")
    assert streaming.should_stream(str(model), rtn, QuantConfig(bits=4))
    assert streaming.should_stream(str(model), gptq, QuantConfig(bits=4))
    assert streaming.should_stream(str(model), make_method("budget", budget_bpw=3.0), QuantConfig(bits=4))
    assert not streaming.should_stream(str(model), rtn, QuantConfig(bits=4, rotate=True))
    assert not streaming.should_stream(str(model), make_method("budget", budget_mb=1.0), QuantConfig(bits=4))
    assert not streaming.should_stream(str(model), make_method("auto", budget_bpw=3.0), QuantConfig(bits=4))
    assert not streaming.should_stream(str(tmp_path / "s"), rtn, QuantConfig(bits=4))  # already quantized


def _spy_on_materialize(monkeypatch, spy) -> None:
    """Route every block-by-block pass's materialize (quantization, calibration capture, Fisher) through ``spy``."""
    for module in (streaming, source, streamed):
        monkeypatch.setattr(module, "materialize", spy)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_at_most_one_block_is_materialised(tmp_path, calib, monkeypatch, method):
    """Instrumented materialize: when a block is loaded no other block holds a real tensor, the block
    really holds its float32 weights after it, every block is loaded once, and the rest (embedding,
    norm, head) only after every block is released; at the end nothing is materialised."""
    model_dir = _bf16_model(tmp_path, layers=3, tied=False, shard="60KB")
    blocks, events = [], []
    original = source.materialize

    def live(module):
        return any(not t.is_meta for t in list(module.parameters()) + list(module.buffers()))

    def mapped_shards():
        return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(model_dir) in line]

    def spy(root, prefix, ckpt, *skip):
        events.append(("capture" if skip else prefix, sum(live(b) for b in blocks)))
        assert mapped_shards() == []  # the checkpoint pages read for earlier blocks are unmapped
        replaced = original(root, prefix, ckpt, *skip)
        if skip:  # GPTQ's calibration pass: what runs before the blocks, neither a block nor the head
            names = {n for n, p in root.named_parameters() if not p.is_meta}
            assert names == {"model.embed_tokens.weight", "model.norm.weight"}  # the untied head stays on meta
        elif prefix:
            blocks.append(root)
            weights = [p for n, p in root.named_parameters() if n.endswith("proj.weight")]
            assert len(weights) == 7 and all(p.dtype == torch.float32 and not p.is_meta for p in weights)
        else:  # the rest: the decoder blocks are not part of the model then
            assert not any(".layers." in n for n, _ in root.named_parameters())
        return replaced

    _spy_on_materialize(monkeypatch, spy)
    stream_quantize_to_dir(str(model_dir), str(tmp_path / "q"), QuantConfig(bits=2, group_size=32), method,
                           progress=False, **(calib if method == "gptq" else {}))  # fmt: skip
    expected = ["model.layers.0", "model.layers.1", "model.layers.2", ""]
    assert [p for p, _ in events] == (["capture"] if method == "gptq" else []) + expected
    assert all(n == 0 for _, n in events)  # no other block alive whenever one is loaded
    assert len({id(b) for b in blocks}) == 3 and not any(live(b) for b in blocks)


KILL_SCRIPT = """
import os, signal, sys
from lowbit.ptq import streaming
from lowbit.quant.surgery import QuantConfig
calls = []
original = streaming.release
def release(module):
    original(module)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
streaming.release = release
streaming.stream_quantize_to_dir(sys.argv[1], sys.argv[2], QuantConfig(bits=4), "rtn", progress=False)
"""


def test_a_killed_run_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    model = _bf16_model(tmp_path, layers=3)
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(model), str(out)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]
    assert len(leftovers) == 1 and is_quantized_dir(leftovers[0])  # recognisable, never loaded as a model
    with pytest.raises(LowbitError, match="interrupted"):
        open_folder(leftovers[0])
    stream_quantize_to_dir(str(model), str(out), QuantConfig(bits=4), progress=False)
    open_folder(out)
    assert not leftovers[0].exists()


def test_an_error_mid_run_leaves_nothing(tmp_path, monkeypatch):
    model = _bf16_model(tmp_path)

    def boom(module):
        raise RuntimeError("disk full")

    monkeypatch.setattr(streaming, "release", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        stream_quantize_to_dir(str(model), str(tmp_path / "q"), QuantConfig(bits=4), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_bad_checkpoints_are_refused_before_any_work(tmp_path):
    model = _bf16_model(tmp_path, tied=False)
    out = tmp_path / "q"

    def refused(spec, needle, **cfg):
        with pytest.raises(LowbitError, match=needle):
            stream_quantize_to_dir(str(spec), str(out), QuantConfig(**{"bits": 4, **cfg}), progress=False)
        assert not out.exists()

    refused(model, "larger than the row length", group_size=4096)
    refused(model, "nothing to quantize", include=["nothing.*"])
    tensors = load_file(model / "model.safetensors")
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, broken / "model.safetensors")
    refused(broken, "has no tensor lm_head.weight")
    save_file({**tensors, "lm_head.weight": tensors["lm_head.weight"][:, :8].contiguous()}, broken / "model.safetensors")
    refused(broken, "has shape")
    raw = (model / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    refused(broken, "outside the file or has the wrong size")
    (broken / "model.safetensors").unlink()
    torch.save(tensors, broken / "pytorch_model.bin")
    refused(broken, "only .bin files")
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "missing.safetensors"}}))
    refused(broken, "lacks the shard")


def test_writer_and_mapped_reader_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(), "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "i64": torch.arange(5), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4), "z.last": torch.randn(1, generator=g).double(),
    }  # fmt: skip
    writer = SafetensorsWriter(tmp_path / "w.safetensors", tmp_path / "work")
    for name, t in tensors.items():
        writer.add(name, t)
    with pytest.raises(ValueError, match="twice"):
        writer.add("f32", tensors["f32"])
    writer.finish({"format": "x"})
    assert not any((tmp_path / "work").iterdir())
    loaded = load_file(tmp_path / "w.safetensors")  # the reference reader accepts the file
    assert sorted(loaded) == sorted(tensors)
    mapped = MappedSafetensors(tmp_path / "w.safetensors")
    assert mapped.metadata == {"format": "x"}
    for name, t in tensors.items():
        got = mapped.get(name)
        assert torch.equal(loaded[name], t) and torch.equal(got, t) and got.dtype == t.dtype, name
        start = mapped.data_start + mapped.entries[name][2]
        if t.numel():  # a view of the mapping, aligned to its element size: nothing copied
            assert got.data_ptr() == mapped._map.ctypes.data + start and start % t.element_size() == 0
    ckpt = Checkpoint(tmp_path)
    assert "f16" in ckpt and ckpt.dtype("bf16") == torch.bfloat16


def test_load_packed_maps_the_file_and_computes_the_same(tmp_path, monkeypatch):
    """load_packed keeps the packed codes as views of the mapped weights file; its outputs equal those
    of a load that reads the file into memory."""
    from lowbit.runtime import packed as runtime
    from lowbit.runtime.packed_linear import PackedLinear

    model = _bf16_model(tmp_path)
    stream_quantize_to_dir(str(model), str(tmp_path / "q"), QuantConfig(bits=4, group_size=32), progress=False)
    packed, _, _ = runtime.load_packed(tmp_path / "q")
    ids = torch.randint(0, packed.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mapped_logits = packed(ids).logits
    weights = str(tmp_path / "q" / "model.safetensors")
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(weights):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((lo, hi))
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert layers and all(any(lo <= m.packed.data_ptr() < hi for lo, hi in ranges) for m in layers)
    real_open = runtime.open_folder
    monkeypatch.setattr(runtime, "open_folder", lambda path, verify, mmap: real_open(path, verify, mmap=False))
    copied, _, _ = runtime.load_packed(tmp_path / "q")
    assert not any(any(lo <= m.packed.data_ptr() < hi for lo, hi in ranges)
                   for m in copied.modules() if isinstance(m, PackedLinear))  # fmt: skip
    with torch.inference_mode():
        assert torch.equal(copied(ids).logits, mapped_logits)


def test_gpt2_conv1d_and_position_embeddings_stream_bit_exact(tmp_path, calib):
    """GPT-2: Conv1D linears (stored transposed) and a learned position table that GPTQ's calibration
    pass needs before the first block; fp16 checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=64))
    model.to(torch.float16).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    cfg = dict(bits=4, group_size=32, overrides={"transformer.h.1.*": {"bits": 2}})
    quantize_to_dir(str(tmp_path / "gpt2"), str(tmp_path / "mem"), QuantConfig(**cfg), "gptq", progress=False,
                    stream=False, **calib)
    stream_quantize_to_dir(str(tmp_path / "gpt2"), str(tmp_path / "st"), QuantConfig(**cfg), "gptq", progress=False,
                           **calib)  # fmt: skip
    assert_same_folder(tmp_path / "mem", tmp_path / "st")


@pytest.mark.parametrize("then", ["gptq", "rtn"])
def test_streamed_budget_plan_matches_in_memory(tmp_path, calib, then):
    """--method budget --budget-bpw with --stream: Fisher block by block, the same plan and folder."""
    model = _bf16_model(tmp_path, hidden=64, layers=3)
    settings = {**calib, "budget_bpw": 3.0, "fisher_tokens": 128, "then_method": then,
                "candidates": ("2:32:auto", "3:32:auto", "4:32:auto", "4:channel:auto")}  # fmt: skip
    ref = quantize_to_dir(str(model), str(tmp_path / "mem"), QuantConfig(bits=4), "budget", progress=False,
                          stream=False, **settings)
    out = stream_quantize_to_dir(str(model), str(tmp_path / "st"), QuantConfig(bits=4), "budget", progress=False,
                                 hidden_limit_bytes=0, **settings)  # fmt: skip
    ma, mb = (json.loads((p / "lowbit.json").read_text()) for p in (tmp_path / "mem", tmp_path / "st"))
    plan_a, plan_b = ma["info"]["report"], mb["info"]["report"]
    settings_a = {k: v["setting"] for k, v in plan_a["plan"].items()}
    assert settings_a == {k: v["setting"] for k, v in plan_b["plan"].items()}
    assert len(set(settings_a.values())) > 1  # a real mix, and the same one
    for key in ("predicted_loss_increase", "predicted_linear_bytes", "bits_per_weight_linear", "tensor_bytes"):
        assert plan_b[key] == pytest.approx(plan_a[key], rel=1e-4), key
    assert_same_folder(tmp_path / "mem", tmp_path / "st")
    assert out["bits_per_weight_linear"] == pytest.approx(ref["bits_per_weight_linear"]) and out["streamed"] is True
    assert plan_b["bits_per_weight_linear"] <= 3.0


def test_streamed_budget_refuses_a_file_budget(tmp_path, calib):
    model = _bf16_model(tmp_path)
    with pytest.raises(LowbitError, match="--stream plans --budget-bpw, not --budget-mb"):
        stream_quantize_to_dir(str(model), str(tmp_path / "st"), QuantConfig(bits=4), "budget", progress=False,
                               budget_mb=1.0, **calib)  # fmt: skip


def test_streamed_budget_holds_one_block_at_a_time(tmp_path, calib, monkeypatch):
    """The Fisher passes (forward, head, backward) and the quantization pass: whenever anything is
    materialised, no decoder block holds a real tensor; each block is loaded three times in all."""
    model_dir = _bf16_model(tmp_path, layers=3, tied=False)
    blocks, alive_at_load, original = {}, [], source.materialize

    def live(module):
        return any(not t.is_meta for t in list(module.parameters()) + list(module.buffers()))

    def spy(root, prefix, ckpt, *skip):
        alive_at_load.append(sum(live(b) for b in blocks.values()))
        if prefix.startswith("model.layers."):
            blocks.setdefault(prefix, root)
            blocks[prefix + f"#{len(alive_at_load)}"] = root
        return original(root, prefix, ckpt, *skip)

    _spy_on_materialize(monkeypatch, spy)
    stream_quantize_to_dir(str(model_dir), str(tmp_path / "q"), QuantConfig(bits=4), "budget", progress=False,
                           budget_bpw=3.0, fisher_tokens=64, then_method="rtn",
                           candidates=("2:32:auto", "4:32:auto"), **calib)  # fmt: skip
    assert alive_at_load and all(n == 0 for n in alive_at_load)
    loads = [k for k in blocks if "#" in k]
    assert sorted({k.split("#")[0] for k in loads}) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert len(loads) == 9 and not any(live(b) for b in blocks.values())
