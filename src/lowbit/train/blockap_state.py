"""Storage for block-wise distillation (:mod:`lowbit.train.blockap`): the two activation streams and
the resumable work folder.

The streams (full-precision and quantized hidden states, windows x seq_len x hidden, float32) live
in RAM, or in memory-mapped scratch files when asked (``cache_dir``) or when they would exceed
``max_cache_gb``. They are scratch only: a resumed run recomputes them from the saved blocks.

The work folder holds what a run killed at any instant needs to continue bit for bit, every file
written atomically (:mod:`lowbit.store.fsio`): ``start.pt`` (the quantized model before any block was
trained), ``block-NNN.pt`` (each finished block) and ``state.pt`` (the settings fingerprint, the
number of finished blocks, the report so far and, inside a block, the step with the block's
trainable state and optimizer state).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.store.fsio import atomic_write, remove_stale_tmp, tmp_prefix

STATE = "state.pt"
START = "start.pt"
STREAMS = "blockap-streams"


class Streams:
    """The two streams ``fp`` and ``q``, each (windows, seq_len, hidden) float32, in RAM or on disk."""

    def __init__(self, shape: tuple[int, int, int], cache_dir: str | None, max_cache_gb: float, fallback: str | None,
                 device: torch.device | str = "cpu"):  # fmt: skip
        self.shape = shape
        self.nbytes = 2 * math.prod(shape) * 4
        self.folder: Path | None = None
        if torch.device(device).type != "cpu":  # on an accelerator the streams stay in its memory
            self.fp, self.q = torch.empty(shape, device=device), torch.empty(shape, device=device)
            return
        if cache_dir is None and self.nbytes <= max_cache_gb * 1e9:
            self.fp, self.q = torch.empty(shape), torch.empty(shape)
            return
        parent = Path(cache_dir or fallback or tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        target = parent / STREAMS
        remove_stale_tmp(target)  # scratch left by a killed run
        self.folder = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix(target)}{os.getpid()}-", dir=parent))
        self.fp, self.q = self._mapped("fp"), self._mapped("q")

    def _mapped(self, name: str) -> torch.Tensor:
        array = np.memmap(self.folder / f"{name}.f32", dtype=np.float32, mode="w+", shape=self.shape)
        return torch.from_numpy(array)

    @property
    def where(self) -> str:
        return "RAM" if self.folder is None else str(self.folder)

    def close(self) -> None:
        """Drop the streams (and their scratch files)."""
        self.fp = self.q = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-1 of named tensors (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha1()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    return tensor_digest(model.state_dict())


class WorkDir:
    """The resumable state of one run in ``path``, tied to a settings ``fingerprint`` (a dict of
    JSON-like values: settings, quantization config, calibration and model digests)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint
        if self.path.exists() and not self.path.is_dir():
            raise LowbitError(f"work_dir {path} is a file: choose a folder for the resumable state")
        if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / STATE).exists():
            foreign = [p.name for p in self.path.iterdir() if not p.name.startswith(".")]
            if foreign:
                raise LowbitError(
                    f"work_dir {path} holds files of something else ({', '.join(sorted(foreign)[:3])}): "
                    "choose a new or empty folder"
                )
        self.path.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict | None:
        """The saved state, or None for a new run; a run with other settings is refused."""
        file = self.path / STATE
        if not file.exists():
            return None
        state = torch.load(file, map_location="cpu", weights_only=False)
        saved = state["fingerprint"]
        differ = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if differ:
            shown = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in differ[:3])
            raise LowbitError(
                f"work_dir {self.path} holds a Block-AP run with other settings ({shown}): rerun with the "
                "same model, config and settings to resume it, or choose another work_dir"
            )
        return state

    def save(self, state: dict) -> None:
        self._write(STATE, {**state, "fingerprint": self.fingerprint})

    def save_start(self, model_state: dict) -> None:
        self._write(START, model_state)

    def load_start(self) -> dict:
        return self._read(START)

    def save_block(self, index: int, block_state: dict) -> None:
        self._write(f"block-{index:03d}.pt", block_state)

    def load_block(self, index: int) -> dict:
        return self._read(f"block-{index:03d}.pt")

    def _write(self, name: str, obj) -> None:
        atomic_write(self.path / name, lambda f: torch.save(obj, f))

    def _read(self, name: str):
        file = self.path / name
        if not file.exists():
            raise LowbitError(f"work_dir {self.path} lacks {name} (files removed?): choose a new work_dir")
        return torch.load(file, map_location="cpu", weights_only=False)


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
