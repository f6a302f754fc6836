"""The run folder of ``lowbit train``: checkpoints (bit-exact resume), RNG states, metrics, the
loss plot, the saved configuration and result, and the final model.

A run resumes bit for bit: the training windows of step ``s`` are a pure function of (seed, s),
and the checkpoint (written atomically through :mod:`lowbit.store.fsio`) holds weights, scales,
optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.eval.models import reference_identity
from lowbit.store.folder import META, META_HASH, write_quantized
from lowbit.store.fsio import OutputKind, atomic_write, staged_files
from lowbit.store.fsio import prepare_out as prepare_out_path
from lowbit.train.config import config_differences

if TYPE_CHECKING:
    from lowbit.train.config import TrainConfig
    from lowbit.train.distributed import DistContext

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RUN_CONFIG = "train_config.json"
RESULT = "train_result.json"
LOSS_PLOT = "loss.png"
STAGING = ".final-model"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on the CPU (also under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict, sharded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def save_checkpoint(
    path: Path, student, optimizer, scheduler, step: int, elapsed: float, data_record: dict, ctx: DistContext
) -> None:
    """Everything needed to continue exactly: weights and scales, optimizer, scheduler, RNG states
    and the step, which is also the data position (the order is a function of seed and step)."""
    model_state, optim_state = full_state(student, optimizer)
    if ctx.is_main:
        state = {
            "step": step,
            "elapsed": elapsed,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "quant_config": student.lowbit_config.to_dict(),
            "data_sha1": data_record["tokens_sha1"],
            "lowbit_version": __version__,
        }
        atomic_write(path, lambda f: torch.save(state, f))
    ctx.barrier()


def load_checkpoint(out: Path, data_record: dict) -> dict:
    """The checkpoint of the run in ``out``, checked to be about the same training data."""
    checkpoint = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    if checkpoint["data_sha1"] != data_record["tokens_sha1"]:
        raise LowbitError(f"the training data differ from those of the run in {out}: cannot resume it exactly")
    return checkpoint


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Metric lines of a run (a torn last line from a kill is skipped), optionally up to a step."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if up_to_step is None or row["step"] <= up_to_step:
                rows.append(row)
    return rows


def truncate_metrics(path: Path, up_to_step: int) -> None:
    """Drop the lines logged after ``up_to_step``: resuming from there replays them."""
    kept = read_metrics(path, up_to_step=up_to_step)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_loss(metrics: list[dict], path: Path, title: str = "") -> None:
    """Loss (and its KL / CE parts) against step and tokens, with the learning rate; Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["loss"] for m in metrics], label="loss", lw=1.2)
    for part in ("kl", "ce"):
        if metrics and part in metrics[0] and metrics[0].get("loss_kind") == "mix":
            ax.plot(steps, [m[part] for m in metrics], label=part, lw=0.8, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [m["lr"] for m in metrics], color="gray", ls="--", lw=0.8, label="lr")
    lr_ax.set_ylabel("weight lr")
    if metrics:
        tokens = metrics[-1]["tokens"]
        ax.set_title(f"{title}  ({tokens:,} tokens)" if title else f"{tokens:,} tokens", fontsize=10)
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def is_run_folder(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file()


TRAIN_OUT = OutputKind("training run", is_run_folder)


def prepare_out(out: Path, cfg: TrainConfig, resume: bool) -> dict | None:
    """Check the run folder (:func:`lowbit.store.fsio.prepare_out`: writable, not overlapping the model,
    empty or new unless resuming a run); returns the saved config dict when resuming."""
    config_path = out / RUN_CONFIG
    if config_path.is_file() and not resume:
        raise LowbitError(f"{out} holds a training run: pass --resume to continue it, or choose another --out")
    prepare_out_path(out, TRAIN_OUT, overwrite=resume, inputs=(cfg.model, cfg.init))
    if config_path.is_file():
        saved = json.loads(config_path.read_text())
        diff = config_differences(saved["config"], cfg.to_dict())
        if diff:
            listed = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise LowbitError(
                f"--resume with settings that differ from the run in {out} ({listed}); "
                "pass the original settings or choose another --out"
            )
        return saved
    return None


def write_run_config(out: Path, cfg: TrainConfig, data_record: dict, world_size: int) -> None:
    """``train_config.json``: the settings of a new run (what ``--resume`` is checked against)."""
    record = {
        "config": cfg.to_dict(),
        "data": data_record,
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "world_size": world_size,
        "finished": False,
    }
    atomic_write(out / RUN_CONFIG, json.dumps(record, indent=2))


def write_result(out: Path, result: dict) -> None:
    """Write ``train_result.json`` and mark the run finished in ``train_config.json``."""
    atomic_write(out / RESULT, json.dumps(result, indent=2, default=str))
    record = json.loads((out / RUN_CONFIG).read_text())
    record["finished"] = True
    atomic_write(out / RUN_CONFIG, json.dumps(record, indent=2))


def publish_model(model: nn.Module, tokenizer, out: Path, info: dict) -> None:
    """Write the quantized folder's files into a staging folder inside ``out``, then move them up,
    the manifest and its hash last (those of an earlier publish are removed first): ``out`` is
    loadable by ``lowbit eval --model out`` only once complete, and refused until then."""
    info = {**info, **reference_identity(info["base_model"])} if info.get("base_model") else info
    with staged_files(out, STAGING, last=(META, META_HASH)) as staging:
        write_quantized(model, tokenizer, staging, info=info)
    shutil.rmtree(staging, ignore_errors=True)
