"""Fault injection (issue 14): ``lowbit quantize / export / train / pareto`` killed with SIGKILL at
seeded points leave every output complete and verified, or absent (never a half-written output
that loads), a rerun cleans what the kill left and succeeds, and the inputs are never touched.

Each run is the real CLI (``lowbit.cli.main``) in its own process, forked from a helper process
that imported torch, transformers and lowbit once (started as ``python -c``), so that a few dozen
runs fit in seconds. A run is killed either at its k-th file-system operation (rename, replace,
fsync, write, unlink, mkdir, rmtree, an ``open`` for writing), k drawn from a seeded generator over
the operations of an unkilled run, or after a seeded delay within the unkilled run's duration.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.pareto.store import RESULTS_FILE, ResultStore, is_store
from lowbit.store import fsio
from lowbit.store.folder import open_folder

SEEDS = (0, 1, 2)  # 0 and 1 kill at a drawn file-system operation, 2 after a drawn delay

_FORKER = r"""
import builtins, io, json, os, shutil, signal, sys, time, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import gguf  # noqa: F401
import torch  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import lowbit.gguf.export, lowbit.pareto.sweep, lowbit.train.loop  # noqa: F401
from lowbit.cli.main import main

os_write, os_open, os_close = os.write, os.open, os.close


def kill_at(k):
    # SIGKILL this process at its k-th file-system operation; returns the running count
    count = [0]

    def hit():
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, counts=lambda *a, **k: True):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if counts(*args, **kwargs):
                hit()
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    for name in ("rename", "replace", "fsync", "write", "unlink", "mkdir"):
        wrap(os, name)
    wrap(shutil, "rmtree")
    writing = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")
    wrap(io, "open", writing)
    wrap(builtins, "open", writing)
    return count


for line in sys.stdin:
    trial = json.loads(line)
    start = time.time()
    pid = os.fork()
    if pid == 0:
        log = os_open(trial["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(trial["cwd"])
        count = kill_at(trial["kill_at"])
        try:
            code = main(trial["argv"])
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os_write(log, ("\nOPS %d\n" % count[0]).encode())
        os_close(log)
        os._exit(code)
    if trial["kill_after"]:
        time.sleep(trial["kill_after"])
        os.kill(pid, signal.SIGKILL)  # a finished child is a zombie until waited for: harmless
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps({"rc": rc, "seconds": time.time() - start}), flush=True)
"""


class Forker:
    """The helper process: one line of JSON in per run, one line of JSON out when it ended."""

    def __init__(self, work: Path):
        self.work = work
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        self.runs = 0

    def run(self, argv: list, kill_at: int = 0, kill_after: float = 0.0) -> dict:
        self.runs += 1
        log = self.work / f"run-{self.runs}.log"
        trial = {"argv": ["--threads", "1", *map(str, argv)], "cwd": str(self.work), "log": str(log)}
        self.proc.stdin.write(json.dumps({**trial, "kill_at": kill_at, "kill_after": kill_after}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the forking helper died (exit {self.proc.poll()})"
        result = json.loads(line)
        text = log.read_text()
        result["log"] = text
        result["ops"] = int(text.rsplit("OPS ", 1)[1]) if "\nOPS " in text else None
        assert result["rc"] in (0, 2, -signal.SIGKILL), f"rc {result['rc']}:\n{text[-3000:]}"
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The helper process, the inputs (tiny model folder, text, a quantized folder) and their digests."""
    work = tmp_path_factory.mktemp("faults")
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(work / "tiny")
    tokenizer.save_pretrained(work / "tiny")
    (work / "text.txt").write_text(SAMPLE_TEXT)
    forker = Forker(work)
    assert forker.run(["quantize", "--model", "tiny", "--bits", "4", "--out", "q"])["rc"] == 0
    inputs = {name: _digest(work / name) for name in ("tiny", "text.txt", "q")}
    yield forker, work, inputs
    forker.close()
    assert {name: _digest(work / name) for name in inputs} == inputs, "an input changed"


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): fsio.sha256_file(p) for p in files}


def _leftovers(out: Path) -> list[str]:
    """Temporary or parked siblings of ``out`` (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _model_whole_or_refused(out: Path) -> bool:
    """The model in ``out`` verifies (True), or loading it is refused (False): never loaded half."""
    try:
        open_folder(out, verify=True)
        return True
    except LowbitError:
        with pytest.raises(LowbitError):
            api.load(str(out))
        return False


def _gguf_whole(out: Path, clean: Path) -> bool:
    from gguf import GGUFReader

    if not out.exists():
        return False
    assert out.stat().st_size == clean.stat().st_size and "lowbit.version" in GGUFReader(out).fields
    return True


def _store_whole(out: Path, clean: Path) -> bool:
    if out.exists():
        results = out / RESULTS_FILE
        if results.exists():  # absent when killed before the first point finished: the store reads it as empty
            assert all(json.loads(line) for line in results.read_bytes().splitlines(keepends=True)
                       if line.endswith(b"\n"))  # fmt: skip
        else:
            assert is_store(out) or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
        with ResultStore(out) as store:
            points = store.read()
        assert set(points) <= set(json.loads(x)["key"] for x in (clean / RESULTS_FILE).read_text().splitlines())
    return (out / "report.html").is_file()


COMMANDS = {
    # name: (argv for an output, check of an output against the clean one -> complete?, rerun flags)
    "quantize": (
        lambda out: ["quantize", "--model", "tiny", "--bits", "2", "--out", out],
        lambda out, clean: out.exists() and _model_whole_or_refused(out),
        [],
    ),
    "export": (
        lambda out: ["export", "q", "--out", out],
        _gguf_whole,
        [],
    ),
    "train": (
        lambda out: ["train", "--model", "tiny", "--bits", "2", "--data", "text.txt", "--steps", "6",
                     "--batch-size", "2", "--seq-len", "32", "--save-every", "2", "--out", out],  # fmt: skip
        lambda out, clean: _model_whole_or_refused(out) and (out / "train_result.json").is_file(),
        ["--resume"],
    ),
    "pareto": (
        lambda out: ["pareto", "--model", "tiny", "--data", "text.txt", "--max-tokens", "256", "--seq-len", "32",
                     "--bits", "4", "2", "--methods", "rtn", "--group-sizes", "channel", "--out", out],  # fmt: skip
        _store_whole,
        [],
    ),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_killed_at_random_points_output_is_whole_or_absent(assets, command):
    forker, work, _ = assets
    argv, whole, rerun_flags = COMMANDS[command]
    name = "m.gguf" if command == "export" else "out"
    clean = work / f"{command}-clean" / name
    clean.parent.mkdir()
    first = forker.run(argv(clean))
    assert first["rc"] == 0 and first["ops"] > 3, first["log"][-3000:]
    assert whole(clean, clean)
    for seed in SEEDS:
        rng = random.Random(f"{command}-{seed}")
        out = work / f"{command}-{seed}" / name
        out.parent.mkdir()
        if seed < 2:
            killed = forker.run(argv(out), kill_at=rng.randint(1, first["ops"]))
        else:
            killed = forker.run(argv(out), kill_after=rng.uniform(0.0, first["seconds"]))
        complete = whole(out, clean)
        assert killed["rc"] == -signal.SIGKILL or complete, killed["log"][-3000:]
        again = forker.run([*argv(out), *rerun_flags])
        if complete and command in ("quantize", "export"):  # a whole output is never replaced unasked
            assert again["rc"] == 2 and "--overwrite" in again["log"], again["log"][-3000:]
        else:
            assert again["rc"] == 0, again["log"][-3000:]
        assert whole(out, clean) and _leftovers(out) == [], _leftovers(out)
        assert not (out / ".final-model").exists()
        shutil.rmtree(out.parent)
