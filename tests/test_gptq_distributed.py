"""GPTQ data-parallel under torchrun: two gloo processes split the calibration batches and sum their
Hessians; the folder rank 0 writes equals the one-process folder tensor for tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli.main import main
from lowbit.eval.models import weight_files


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lowbit.cli", "--threads", "1", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _tensors(folder) -> dict[str, torch.Tensor]:
    files = weight_files(str(folder))
    assert files, f"no weight files in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def _gptq_args(model_dir, text_file, out, tokens: int) -> list[str]:
    return ["quantize", "--method", "gptq", "--model", str(model_dir), "--bits", "2", "--group-size", "16",
            "--calib", str(text_file), "--calib-tokens", str(tokens), "--seq-len", "32", "--sequential",
            "--out", str(out), "--json"]


@pytest.mark.slow
def test_two_processes_write_the_one_process_folder(tiny_model_dir, sample_text_file, tmp_path, capsys):
    # 20 windows in batches of 8: rank 0 takes batch 0 (8 windows), rank 1 batches 1-2 (8 + 4 windows)
    threads = torch.get_num_threads()
    try:
        assert main(["--threads", "1", *_gptq_args(tiny_model_dir, sample_text_file, tmp_path / "one", 640)]) == 0
    finally:
        torch.set_num_threads(threads)
    single = json.loads(capsys.readouterr().out)
    assert "world_size" not in single

    proc = _torchrun(*_gptq_args(tiny_model_dir, sample_text_file, tmp_path / "two", 640))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)  # one JSON document: rank 1 prints nothing
    assert record["world_size"] == 2 and record["method"] == "gptq"
    assert record["total_bytes"] == single["total_bytes"]

    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert sorted(a) == sorted(b)
    assert any(k.endswith(".qweight") for k in a)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ from the one-process run: {differ[:5]}"
    meta = [json.loads((tmp_path / d / "lowbit.json").read_text()) for d in ("one", "two")]
    assert meta[0]["quant_config"] == meta[1]["quant_config"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())


@pytest.mark.slow
def test_torchrun_refusals_are_one_line(tiny_model_dir, sample_text_file, tmp_path):
    # 8 windows make one batch of 8: fewer batches than the 2 processes
    proc = _torchrun(*_gptq_args(tiny_model_dir, sample_text_file, tmp_path / "few", 256))
    assert proc.returncode != 0
    assert "fewer batches than processes" in proc.stderr
    assert not (tmp_path / "few" / "lowbit.json").exists()
    blockap = ["quantize", "--method", "blockap", "--model", str(tiny_model_dir), "--bits", "2",
               "--out", str(tmp_path / "bap"), "--json"]
    proc = _torchrun(*blockap)
    assert proc.returncode != 0
    assert "--method blockap runs in one process: launch it without torchrun" in proc.stderr
    assert not (tmp_path / "bap").exists()
