"""Quantization-aware training: the ParetoQ recipe, distilled from the full-precision model.

ParetoQ (METHODS.md section 1): start from the pretrained model, fake-quantize every linear layer
with the quantizer its bit-width calls for (``QuantConfig(bits, quantizer="auto")``: binary, SEQ
or LSQ) and train the latent weights (straight-through) and the scales (LSQ gradient) with AdamW,
a linear warm-up and a cosine decay to zero. The scales form their own parameter group, with
their own learning rate and no weight decay.

LLM-QAT (METHODS.md section 2): a frozen copy of the full-precision model is the teacher and the
loss is ``KL(teacher || student)`` on the logits (temperature 1), next-token cross-entropy, or a
mix. In data-free mode the teacher writes the training text itself (first token random, the next
few greedy, the rest sampled), cached on disk with a JSON record of how it was made.

Runs resume bit for bit: the training windows of step ``s`` are a pure function of (seed, s), and
the checkpoint (written to a temporary file, then renamed into place) holds weights, scales,
optimizer, scheduler and RNG states. The same code runs alone or under ``torchrun`` with DDP
(or FSDP), each rank taking its slice of the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.data import describe_text, get_text, tokenize_windows
from lowbit.errors import LowbitError
from lowbit.fsio import atomic_write
from lowbit.io import is_quantized_dir, load_quantized, save_quantized
from lowbit.models import DEFAULT_MODEL, cache_root, load_model, model_id
from lowbit.ptq import gptq
from lowbit.quantizers import Quantizer, parse_bits
from lowbit.surgery import HP_DTYPES, QuantConfig, quantize_model, quantized_modules, round_high_precision_

LOSSES = ("kl", "ce", "mix")
INITS = ("rtn", "gptq")
DTYPES = ("auto", "fp32", "bf16")
FIRST_TOKENS = ("random", "bos")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RUN_CONFIG = "train_config.json"
RESULT = "train_result.json"
LOSS_PLOT = "loss.png"
STAGING = ".final-model"

# Settings that may differ between a run and its --resume: they do not change the trained model.
RESUME_MAY_CHANGE = frozenset({"save_every", "log_every", "keep_checkpoint"})


def default_lr(bits: float) -> float:
    """ParetoQ's weight learning rate: 2e-5 at 2 bits and below, 1e-5 at 3 and 4 bits."""
    return 2e-5 if bits <= 2 else 1e-5


@dataclass
class TrainConfig:
    """Everything that defines a QAT run. ``data`` is a text name, a UTF-8 file or a ``.pt`` token
    tensor; ``data_free`` is the number of tokens the teacher writes instead. ``batch_size`` is the
    global number of sequences per micro-step (split over ranks); one optimizer step sees
    ``batch_size * grad_accum`` sequences. ``init`` is rtn, gptq or a lowbit quantized folder."""

    out: str
    bits: float
    steps: int
    model: str = DEFAULT_MODEL
    data: str | None = None
    data_free: int | None = None
    data_tokens: int | None = None
    quantizer: str = "auto"
    group_size: int | None = None
    scale_search: str = "mse"
    init: str = "rtn"
    calib: str = "wiki-calib"
    calib_tokens: int = 16384
    lr: float | None = None
    scale_lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    warmup: int = 0
    grad_clip: float = 1.0
    loss: str = "kl"
    kl_weight: float = 0.5
    seed: int = 0
    dtype: str = "auto"
    fsdp: bool = False
    compile: bool = False
    first_token: str = "random"
    greedy_tokens: int = 3
    gen_batch: int = 16
    save_every: int = 50
    log_every: int = 1
    keep_checkpoint: bool = False

    def __post_init__(self):
        self.bits = parse_bits(self.bits)
        if self.lr is None:
            self.lr = default_lr(self.bits)
        if self.scale_lr is None:
            self.scale_lr = self.lr
        self.validate()

    def validate(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LowbitError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "log_every", "gen_batch"):
            positive(name)
        if self.seq_len < 2:
            raise LowbitError("seq-len must be at least 2 tokens (one to read, one to predict)")
        if not 0 <= self.warmup < self.steps:
            raise LowbitError(f"warmup must be in [0, steps) = [0, {self.steps}), got {self.warmup}")
        if self.loss not in LOSSES:
            raise LowbitError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise LowbitError(f"kl-weight must be in [0, 1], got {self.kl_weight}")
        if self.lr <= 0 or self.scale_lr < 0 or self.weight_decay < 0:
            raise LowbitError("lr must be > 0, scale-lr and weight-decay >= 0")
        if self.dtype not in DTYPES:
            raise LowbitError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.first_token not in FIRST_TOKENS:
            raise LowbitError(f"first-token must be one of {', '.join(FIRST_TOKENS)}, not {self.first_token!r}")
        if self.scale_search not in ("none", "mse"):
            raise LowbitError(f"unknown scale search {self.scale_search!r}: use 'none' or 'mse'")
        if (self.data is None) == (self.data_free is None):
            raise LowbitError(
                "give training data: --data (wiki-train, a text file or a .pt token tensor) or "
                "--data-free N_TOKENS (the teacher writes the text), not both and not neither"
            )
        if self.data_free is not None and self.data_free < self.seq_len:
            raise LowbitError(f"--data-free {self.data_free} is less than one window of seq-len {self.seq_len} tokens")
        if self.init not in INITS and not is_quantized_dir(self.init):
            raise LowbitError(f"--init must be rtn, gptq or a lowbit quantized folder, got {self.init!r}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def quant_config(self) -> QuantConfig:
        return QuantConfig(
            bits=self.bits, quantizer=self.quantizer, group_size=self.group_size, scale_search=self.scale_search
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# schedule, data order, loss


def lr_multiplier(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_indices(seed: int, step: int, global_batch: int, n_windows: int) -> torch.Tensor:
    """Window indices of optimizer step ``step``, a pure function of (seed, step).

    The windows are read epoch after epoch, each epoch in its own permutation seeded by
    (seed, epoch), so a resumed run reads exactly what an unbroken one would have read.
    """
    parts, pos, end = [], step * global_batch, (step + 1) * global_batch
    while pos < end:
        epoch, offset = divmod(pos, n_windows)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_windows, generator=gen)
        take = min(end - pos, n_windows - offset)
        parts.append(perm[offset : offset + take])
        pos += take
    return torch.cat(parts)


def distillation_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    kind: str = "kl",
    kl_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kl``: mean over positions of KL(teacher || student), temperature 1; ``ce``: next-token
    cross-entropy on ``ids``; ``mix``: ``kl_weight * kl + (1 - kl_weight) * ce``."""
    parts: dict[str, torch.Tensor] = {}
    logits = logits.float()
    if kind in ("kl", "mix"):
        logp = F.log_softmax(logits, dim=-1).flatten(0, -2)
        t_logp = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
        parts["kl"] = F.kl_div(logp, t_logp, log_target=True, reduction="batchmean")
    if kind in ("ce", "mix"):
        parts["ce"] = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    if kind == "kl":
        loss = parts["kl"]
    elif kind == "ce":
        loss = parts["ce"]
    else:
        loss = kl_weight * parts["kl"] + (1.0 - kl_weight) * parts["ce"]
    return loss, {k: v.detach() for k, v in parts.items()}


def param_groups(model: nn.Module, lr: float, scale_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (weight decay), vectors (norms, biases: none) and quantizer scales
    (their own learning rate, no weight decay). Empty groups are left out."""
    groups = {"weights": [], "vectors": [], "scales": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("quantizer.alpha"):
            groups["scales"].append(p)
        elif p.ndim >= 2:
            groups["weights"].append(p)
        else:
            groups["vectors"].append(p)
    settings = {"weights": (lr, weight_decay), "vectors": (lr, 0.0), "scales": (scale_lr, 0.0)}
    return [
        {"params": params, "lr": settings[name][0], "weight_decay": settings[name][1], "name": name}
        for name, params in groups.items()
        if params
    ]


# ----------------------------------------------------------------------------------------------
# training data


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 over the model config and every tensor of its state dict (names, shapes, bytes)."""
    h = hashlib.sha1(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokens_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha1(windows.to(torch.int64).numpy().tobytes()).hexdigest()


def windows_from_file(path: str, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """A ``.pt`` file holding a 1-D or 2-D integer token tensor, cut into windows of ``seq_len``."""
    try:
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise LowbitError(f"cannot read token file {path}: {exc}") from exc
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.ndim not in (1, 2):
        raise LowbitError(f"{path} must hold one 1-D or 2-D integer tensor of token ids")
    flat = tokens.reshape(-1).to(torch.long)
    if max_tokens is not None:
        flat = flat[:max_tokens]
    n = flat.numel() // seq_len
    if n == 0:
        raise LowbitError(f"{path} has {flat.numel()} tokens, fewer than one window of seq-len {seq_len}")
    return flat[: n * seq_len].view(n, seq_len)


def data_free_dir() -> Path:
    """Where teacher-written token tensors are cached: ``cache_root() / "datafree"``."""
    return cache_root() / "datafree"


def check_disk_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Raise LowbitError unless ``folder`` has room for ``needed_bytes`` plus a 64 MiB margin."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes + (64 << 20):
        raise LowbitError(
            f"not enough disk space for {what}: {needed_bytes / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free in {folder}; free some space or set LOWBIT_CACHE elsewhere"
        )


@torch.no_grad()
def generate_tokens(
    teacher: nn.Module,
    n_sequences: int,
    seq_len: int,
    seed: int,
    first_ids: torch.Tensor,
    greedy_tokens: int = 3,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """Teacher-written sequences (n_sequences, seq_len) as in LLM-QAT: the first token drawn
    uniformly from ``first_ids``, the next ``greedy_tokens`` greedy, the rest sampled (T=1)."""
    device = next(teacher.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    first_ids = first_ids.to(device)
    out = []
    teacher.eval()
    bar = tqdm(total=n_sequences * seq_len, desc="teacher writes", unit="tok", disable=not progress)
    for start in range(0, n_sequences, batch_size):
        b = min(batch_size, n_sequences - start)
        pick = torch.randint(len(first_ids), (b,), generator=gen, device=device)
        ids = first_ids[pick].unsqueeze(1)
        result = teacher(input_ids=ids, use_cache=True)
        for t in range(1, seq_len):
            logits = result.logits[:, -1].float()
            if t <= greedy_tokens:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
            if t < seq_len - 1:
                result = teacher(input_ids=nxt, past_key_values=result.past_key_values, use_cache=True)
        out.append(ids.cpu())
        bar.update(b * seq_len)
    bar.close()
    return torch.cat(out)


def first_token_ids(teacher: nn.Module, tokenizer, mode: str) -> torch.Tensor:
    """Candidates for the first token: the whole vocabulary minus special tokens, or the BOS."""
    if mode == "bos":
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        bos = bos if bos is not None else getattr(teacher.config, "bos_token_id", None)
        if bos is None:
            raise LowbitError("--first-token bos: this model has no BOS token; use --first-token random")
        return torch.tensor([int(bos)])
    vocab = min(len(tokenizer), teacher.config.vocab_size) if tokenizer is not None else teacher.config.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    return torch.tensor([i for i in range(vocab) if i not in special])


def data_free_windows(
    teacher: nn.Module, tokenizer, cfg: TrainConfig, fingerprint: str, progress: bool = True, write: bool = True
) -> tuple[torch.Tensor, dict]:
    """The teacher-written training tokens for ``cfg``, read from the cache if the same settings
    were asked before, else generated and cached (``.pt`` tensor + ``.json`` record)."""
    n_sequences = -(-cfg.data_free // cfg.seq_len)
    recipe = {
        "kind": "data-free",
        "teacher_sha1": fingerprint,
        "n_sequences": n_sequences,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "first_token": cfg.first_token,
        "greedy_tokens": cfg.greedy_tokens,
        "sampling": "multinomial, temperature 1, no top-k",
        "gen_batch": cfg.gen_batch,
    }
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    folder = data_free_dir()
    tensor_path, record_path = folder / f"{key}.pt", folder / f"{key}.json"
    if tensor_path.is_file() and record_path.is_file():
        windows = torch.load(tensor_path, weights_only=True).to(torch.long)
        record = json.loads(record_path.read_text())
        return windows, {**record, "cache": str(tensor_path), "cache_hit": True}
    if not write:
        raise LowbitError(f"data-free cache {tensor_path} is missing (rank 0 should have written it)")
    needed = n_sequences * cfg.seq_len * 4 + 4096
    check_disk_space(folder, needed, f"the data-free token cache ({n_sequences} x {cfg.seq_len} tokens)")
    t0 = time.time()
    first = first_token_ids(teacher, tokenizer, cfg.first_token)
    windows = generate_tokens(
        teacher, n_sequences, cfg.seq_len, cfg.seed, first, cfg.greedy_tokens, cfg.gen_batch, progress
    )
    record = {
        **recipe,
        "teacher": model_id(cfg.model),
        "tokens": int(windows.numel()),
        "tokens_sha1": tokens_fingerprint(windows),
        "generate_seconds": round(time.time() - t0, 2),
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    check_disk_space(folder, needed, f"the data-free token cache ({n_sequences} x {cfg.seq_len} tokens)")
    atomic_write(tensor_path, lambda f: torch.save(windows.to(torch.int32), f))
    atomic_write(record_path, lambda f: f.write(json.dumps(record, indent=2).encode()))
    return windows, {**record, "cache": str(tensor_path), "cache_hit": False}


def training_windows(cfg: TrainConfig, tokenizer) -> tuple[torch.Tensor, dict]:
    """Windows (n, seq_len) read from ``cfg.data`` and a record of where they came from."""
    if cfg.data.endswith(".pt"):
        windows = windows_from_file(cfg.data, cfg.seq_len, cfg.data_tokens)
        record = {"kind": "tokens", "source": cfg.data}
    else:
        if tokenizer is None:
            raise LowbitError(f"reading text {cfg.data!r} needs a tokenizer: the model folder has none")
        windows = tokenize_windows(tokenizer, get_text(cfg.data), cfg.seq_len, max_tokens=cfg.data_tokens)
        record = {"kind": "text", "source": cfg.data, "description": describe_text(cfg.data)}
    return windows, {**record, "tokens": int(windows.numel()), "tokens_sha1": tokens_fingerprint(windows)}


# ----------------------------------------------------------------------------------------------
# models


def load_teacher(spec: str) -> tuple[nn.Module, object]:
    """The full-precision model (teacher and starting point) and its tokenizer."""
    if Path(spec).is_dir() and is_quantized_dir(spec):
        raise LowbitError(
            f"--model {spec} is a quantized folder, but QAT needs the full-precision model as teacher: "
            "pass the original model as --model and the quantized folder as --init"
        )
    teacher, tokenizer = load_model(spec)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, tokenizer


def _check_same_architecture(student: nn.Module, teacher: nn.Module, where: str) -> None:
    s = {k: tuple(v.shape) for k, v in student.state_dict().items() if ".quantizer." not in k}
    t = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    if s != t:
        raise LowbitError(f"{where} is not a quantized copy of the teacher model (weights differ in names or shapes)")


def build_student(teacher: nn.Module, tokenizer, cfg: TrainConfig, progress: bool = True) -> nn.Module:
    """The model to train: a quantized copy of the teacher, initialised by RTN (scales from
    ``cfg.scale_search``, latent weights left in full precision), by GPTQ, or from a folder."""
    qconfig = cfg.quant_config()
    if cfg.init == "rtn":
        return quantize_model(copy.deepcopy(teacher), qconfig)
    if cfg.init == "gptq":
        if tokenizer is None:
            raise LowbitError("--init gptq reads calibration text and needs a tokenizer")
        ids = tokenize_windows(tokenizer, get_text(cfg.calib), 512, max_tokens=cfg.calib_tokens)
        return gptq(copy.deepcopy(teacher), qconfig, ids, progress=progress)
    student, _, meta = load_quantized(cfg.init)
    saved = QuantConfig.from_dict(meta["quant_config"])
    if (saved.bits, saved.group_size) != (qconfig.bits, qconfig.group_size) or saved.quantizer != qconfig.quantizer:
        raise LowbitError(
            f"--init {cfg.init} holds bits={saved.bits:g}, group_size={saved.group_size}, quantizer={saved.quantizer}; "
            f"this run asks for bits={qconfig.bits:g}, group_size={qconfig.group_size}, quantizer={qconfig.quantizer}"
        )
    _check_same_architecture(student, teacher, f"--init {cfg.init}")
    return student


def student_skeleton(teacher: nn.Module, qconfig: QuantConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A quantized copy of the teacher whose scales have the shapes stored in ``state``."""
    student = quantize_model(copy.deepcopy(teacher), qconfig, initialize=False)
    for name, module in quantized_modules(student):
        module.quantizer.set_scales(state[f"{name}.quantizer.alpha"], state[f"{name}.quantizer.zero"])
    return student


def compile_quantizers_(model: nn.Module) -> None:
    """``torch.compile`` every quantizer's fake-quant forward: its ~10 elementwise passes over the
    weight (and their saved tensors) fuse into a few kernels, ~3x faster on CPU. Needs a C++
    compiler on CPU; each distinct weight shape compiles once (seconds)."""
    for _, module in quantized_modules(model):
        quantizer = module.quantizer
        if "forward" not in vars(quantizer):
            quantizer.forward = torch.compile(quantizer.forward, dynamic=False)


def uncompile_quantizers_(model: nn.Module) -> None:
    """Back to the eager fake-quant, the exact arithmetic that saving and evaluation use."""
    for _, module in quantized_modules(model):
        vars(module.quantizer).pop("forward", None)


@torch.no_grad()
def round_for_storage_(model: nn.Module) -> None:
    """Round scales to fp16-exact steps and high-precision tensors to the stored dtype, so that the
    saved folder evaluates exactly like the model in memory."""
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.round_scales_(torch.float16)
    round_high_precision_(model, HP_DTYPES[model.lowbit_config.hp_dtype])


# ----------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.world
        return values


def setup_distributed() -> DistContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group:
    nccl on CUDA, gloo on CPU. Without them: one process on the first GPU or the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=2)
        )
    return DistContext(rank, world, local_rank, device)


def _shard(student: nn.Module, teacher: nn.Module) -> None:
    """FSDP2: shard every decoder block, then the whole model, of both student and teacher."""
    from torch.distributed.fsdp import fully_shard

    from lowbit.ptq import find_decoder_layers

    for model in (student, teacher):
        for block in find_decoder_layers(model):
            fully_shard(block)
        fully_shard(model)


# ----------------------------------------------------------------------------------------------
# checkpoints and run folder


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


def _full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_full_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict, sharded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


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


def _prepare_out(out: Path, cfg: TrainConfig, resume: bool) -> dict | None:
    """Check the run folder; returns the saved config dict when resuming an existing run."""
    config_path = out / RUN_CONFIG
    if config_path.is_file():
        if not resume:
            raise LowbitError(f"{out} holds a training run: pass --resume to continue it, or choose another --out")
        saved = json.loads(config_path.read_text())
        wanted = cfg.to_dict()
        diff = {
            k: (saved["config"].get(k), v)
            for k, v in wanted.items()
            if k not in RESUME_MAY_CHANGE and saved["config"].get(k) != v
        }
        if diff:
            listed = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise LowbitError(
                f"--resume with settings that differ from the run in {out} ({listed}); "
                "pass the original settings or choose another --out"
            )
        return saved
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LowbitError(f"--out {out} exists and is not a lowbit training run: choose a new or empty folder")
    return None


def _publish_model(model: nn.Module, tokenizer, out: Path, info: dict) -> None:
    """save_quantized into a staging folder inside ``out``, then move its files up, lowbit.json
    last: ``out`` becomes loadable by ``lowbit eval --model out`` only once complete."""
    staging = out / STAGING
    save_quantized(model, tokenizer, staging, info=info)
    names = sorted(p.name for p in staging.iterdir())
    for name in [n for n in names if n != "lowbit.json"] + ["lowbit.json"]:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# the optimization loop, shared by the in-memory train() and the resumable run()


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _no_sync(model: nn.Module, student: nn.Module, cfg: TrainConfig, ctx: DistContext):
    """Context that skips the gradient all-reduce on accumulation micro-steps."""
    if cfg.fsdp:

        @contextlib.contextmanager
        def off():
            student.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                student.set_requires_gradient_sync(True)

        return off
    return model.no_sync if ctx.active else contextlib.nullcontext


def make_optimizer(student: nn.Module, cfg: TrainConfig):
    """AdamW over :func:`param_groups` and its warm-up + cosine schedule (per optimizer step)."""
    optimizer = torch.optim.AdamW(param_groups(student, cfg.lr, cfg.scale_lr, cfg.weight_decay), betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg.warmup, cfg.steps))
    return optimizer, scheduler


def _optimize(
    cfg: TrainConfig,
    ctx: DistContext,
    model: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    optimizer,
    scheduler,
    start_step: int = 0,
    elapsed_before: float = 0.0,
    progress: bool = True,
    on_log=None,
    on_step=None,
) -> float:
    """Optimizer steps ``start_step .. cfg.steps``; ``model`` is ``student`` or its DDP wrapper.

    Each step reads the windows :func:`step_indices` gives it, ``batch_size`` per micro-step
    (this rank's slice of them), and averages the loss over the global batch. ``on_log(row)`` is
    called every ``log_every`` steps, ``on_step(step, elapsed)`` after every step. Returns the
    total elapsed seconds.
    """
    autocast = _autocast(cfg, ctx.device)
    sync_off = _no_sync(model, student, cfg, ctx)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    local = cfg.batch_size // ctx.world
    student.train()
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc=f"QAT {cfg.bits:g}-bit",
        unit="step",
        disable=not (progress and ctx.is_main),
    )
    t_start = time.time()
    t_last, tokens_last = t_start, start_step * tokens_per_step
    try:
        for step in range(start_step, cfg.steps):
            indices = step_indices(cfg.seed, step, cfg.global_batch, len(windows))
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(3)
            for micro in range(cfg.grad_accum):
                batch = indices[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
                ids = windows[batch[ctx.rank * local : (ctx.rank + 1) * local]].to(ctx.device)
                last = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if last else sync_off(), autocast():
                    teacher_logits = None
                    if cfg.loss != "ce":
                        with torch.no_grad():
                            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss, parts = distillation_loss(logits, ids, teacher_logits, cfg.loss, cfg.kl_weight)
                    (loss / cfg.grad_accum).backward()
                zero = torch.zeros((), device=loss.device)
                sums += torch.stack([loss.detach(), parts.get("kl", zero), parts.get("ce", zero)]).float().cpu()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            lrs = [g["lr"] for g in optimizer.param_groups]
            optimizer.step()
            scheduler.step()
            done = step + 1
            sums = ctx.mean(sums.to(ctx.device)).cpu() / cfg.grad_accum
            bar.update(1)
            now = time.time()
            if on_log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                tokens = done * tokens_per_step
                row = {
                    "step": done,
                    "loss": float(sums[0]),
                    "lr": lrs[0],
                    "scale_lr": lrs[-1],
                    "tokens": tokens,
                    "tokens_per_s": (tokens - tokens_last) / max(now - t_last, 1e-9),
                    "elapsed": round(elapsed_before + now - t_start, 3),
                    "loss_kind": cfg.loss,
                }
                if cfg.loss == "mix":
                    row.update(kl=float(sums[1]), ce=float(sums[2]))
                t_last, tokens_last = now, tokens
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                on_log(row)
            if on_step is not None:
                on_step(done, elapsed_before + now - t_start)
    finally:
        bar.close()
    return elapsed_before + time.time() - t_start


def _as_windows(data: str | torch.Tensor, tokenizer, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.ndim not in (1, 2):
            raise LowbitError("token data must be a 1-D or 2-D integer tensor of token ids")
        flat = data.reshape(-1).to(torch.long)[: cfg.data_tokens]
        n = flat.numel() // cfg.seq_len
        if n == 0:
            raise LowbitError(f"the token tensor has {flat.numel()} tokens, fewer than one window of {cfg.seq_len}")
        windows = flat[: n * cfg.seq_len].view(n, cfg.seq_len)
        return windows, {
            "kind": "tokens",
            "source": "tensor",
            "tokens": int(windows.numel()),
            "tokens_sha1": tokens_fingerprint(windows),
        }
    return training_windows(cfg, tokenizer)


def train(
    model: nn.Module,
    config: QuantConfig,
    tokenizer=None,
    data: str | torch.Tensor = "wiki-train",
    steps: int = 100,
    seq_len: int = 256,
    seed: int = 0,
    progress: bool = True,
    teacher: nn.Module | None = None,
    **settings,
) -> dict:
    """QAT in memory, no run folder: quantize ``model`` in place with ``config`` and train it.

    ``data`` is a text name, a text file, a ``.pt`` token file or a token tensor. The teacher is a
    frozen copy of ``model`` taken before quantizing, or ``teacher`` (needed when ``model`` is
    already quantized, e.g. by GPTQ). ``settings`` are further :class:`TrainConfig` fields
    (batch_size, grad_accum, lr, scale_lr, warmup, loss, kl_weight, ...). The scales and
    high-precision tensors end rounded for storage. Returns the loss record.
    """
    cfg = TrainConfig(
        out="",
        bits=config.bits,
        quantizer=config.quantizer,
        group_size=config.group_size,
        scale_search=config.scale_search,
        steps=steps,
        seq_len=seq_len,
        seed=seed,
        data=data if isinstance(data, str) else "tensor",
        **settings,
    )
    if getattr(model, "lowbit_config", None) is not None:
        if teacher is None and cfg.loss != "ce":
            raise LowbitError(
                "the model is already quantized, so it cannot be its own teacher: pass teacher= (the "
                "full-precision model) or use loss='ce'"
            )
    else:
        if teacher is None and cfg.loss != "ce":
            teacher = copy.deepcopy(model)
        quantize_model(model, config)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    windows, data_record = _as_windows(data, tokenizer, cfg)
    if cfg.global_batch > len(windows):
        raise LowbitError(f"one step needs {cfg.global_batch} windows of {seq_len} tokens, the data has {len(windows)}")
    seed_everything(seed)
    model.requires_grad_(True)
    if cfg.compile:
        compile_quantizers_(model)
    optimizer, scheduler = make_optimizer(model, cfg)
    rows: list[dict] = []
    ctx = DistContext(device=next(model.parameters()).device)
    elapsed = _optimize(
        cfg, ctx, model, model, teacher, windows, optimizer, scheduler, progress=progress, on_log=rows.append
    )
    model.eval()
    uncompile_quantizers_(model)
    round_for_storage_(model)
    tokens = steps * cfg.global_batch * seq_len
    return {
        "steps": steps,
        "train_tokens": tokens,
        "train_seconds": round(elapsed, 2),
        "tokens_per_s": tokens / elapsed,
        "first_loss": rows[0]["loss"],
        "final_loss": rows[-1]["loss"],
        "data": data_record,
        "metrics": rows,
    }


# ----------------------------------------------------------------------------------------------
# the resumable run (lowbit train)


@dataclass
class TrainRun:
    """What :func:`run` hands back: the trained (storage-rounded) model, its teacher and record."""

    model: nn.Module | None
    teacher: nn.Module | None
    tokenizer: object
    result: dict


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainRun:
    """Run (or resume) QAT as ``cfg`` says, in the folder ``cfg.out``: the quantized model,
    ``metrics.jsonl``, ``loss.png``, ``train_config.json`` and ``train_result.json``.

    Under torchrun every rank calls this; only rank 0's result is complete (others get
    ``{"rank": r}``). A checkpoint is written every ``save_every`` steps and at the end.
    """
    out = Path(cfg.out)
    ctx = setup_distributed()
    if cfg.batch_size % ctx.world:
        raise LowbitError(f"batch-size {cfg.batch_size} must be a multiple of the number of processes ({ctx.world})")
    if cfg.fsdp and not ctx.active:
        raise LowbitError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N")
    saved = _prepare_out(out, cfg, resume)
    if saved is not None and saved.get("finished") and (out / RESULT).is_file():
        _teardown(ctx)
        return TrainRun(None, None, None, json.loads((out / RESULT).read_text()))
    ctx.barrier()

    teacher, tokenizer = load_teacher(cfg.model)
    if cfg.data_free is not None:  # rank 0 writes (or finds) the cache, the others read it
        if ctx.is_main:
            fingerprint = model_fingerprint(teacher)
            windows, data_record = data_free_windows(teacher.to(ctx.device), tokenizer, cfg, fingerprint, progress)
            teacher.to("cpu")
        ctx.barrier()
        if not ctx.is_main:
            windows, data_record = data_free_windows(
                teacher, tokenizer, cfg, model_fingerprint(teacher), progress=False, write=False
            )
    else:
        windows, data_record = training_windows(cfg, tokenizer)
    if cfg.global_batch > len(windows):
        raise LowbitError(
            f"one step needs batch-size x grad-accum = {cfg.global_batch} windows of {cfg.seq_len} tokens, "
            f"but the data has only {len(windows)}: use more data, a smaller batch or a shorter seq-len"
        )

    checkpoint = None
    if saved is not None and (out / CHECKPOINT).is_file():
        checkpoint = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
        if checkpoint["data_sha1"] != data_record["tokens_sha1"]:
            raise LowbitError(f"the training data differ from those of the run in {out}: cannot resume it exactly")
    seed_everything(cfg.seed)
    if checkpoint is not None:
        student = student_skeleton(teacher, QuantConfig.from_dict(checkpoint["quant_config"]), checkpoint["model"])
    else:
        student = build_student(teacher, tokenizer, cfg, progress=progress and ctx.is_main)
    student.requires_grad_(True)
    student.to(ctx.device)
    teacher.to(ctx.device)
    if cfg.compile:
        compile_quantizers_(student)
    model = student
    if cfg.fsdp:
        _shard(student, teacher)
    elif ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer, scheduler = make_optimizer(student, cfg)

    start_step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        _load_full_state(student, optimizer, checkpoint["model"], checkpoint["optimizer"], cfg.fsdp)
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        start_step, elapsed_before = checkpoint["step"], checkpoint["elapsed"]
        del checkpoint
    metrics_path = out / METRICS
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            record = {
                "config": cfg.to_dict(),
                "data": data_record,
                "lowbit_version": __version__,
                "torch_version": torch.__version__,
                "world_size": ctx.world,
                "finished": False,
            }
            atomic_write(out / RUN_CONFIG, lambda f: f.write(json.dumps(record, indent=2).encode()))
        # lines logged after the checkpoint we resume from are about to be replayed: drop them
        kept = read_metrics(metrics_path, up_to_step=start_step)
        atomic_write(metrics_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    ctx.barrier()

    metrics_file = open(metrics_path, "a") if ctx.is_main else None

    def on_log(row):
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def on_step(step, elapsed):
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(out / CHECKPOINT, student, optimizer, scheduler, step, elapsed, data_record, ctx)

    try:
        elapsed = _optimize(
            cfg,
            ctx,
            model,
            student,
            teacher,
            windows,
            optimizer,
            scheduler,
            start_step,
            elapsed_before,
            progress,
            on_log,
            on_step,
        )
    finally:
        if metrics_file is not None:
            metrics_file.close()
    return _finish(cfg, out, ctx, student, teacher, tokenizer, data_record, elapsed, start_step)


def save_checkpoint(
    path: Path, student, optimizer, scheduler, step: int, elapsed: float, data_record: dict, ctx: DistContext
) -> None:
    """Everything needed to continue exactly: weights and scales, optimizer, scheduler, RNG states
    and the step, which is also the data position (the order is a function of seed and step)."""
    model_state, optim_state = _full_state(student, optimizer)
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


def _finish(cfg, out, ctx, student, teacher, tokenizer, data_record, elapsed, start_step) -> TrainRun:
    """Round the model for storage, save the folder, plot the loss and write the record (rank 0)."""
    if cfg.fsdp:  # gather the full weights on rank 0 into a plain, unsharded model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ctx.is_main:
            teacher = load_teacher(cfg.model)[0]
            student = student_skeleton(teacher, student.lowbit_config, state)
            student.load_state_dict(state)
    if not ctx.is_main:
        ctx.barrier()
        _teardown(ctx)
        return TrainRun(None, None, tokenizer, {"rank": ctx.rank})
    student = student.to("cpu").eval()
    teacher = teacher.to("cpu")
    uncompile_quantizers_(student)
    round_for_storage_(student)
    metrics = read_metrics(out / METRICS)
    tokens = cfg.steps * cfg.global_batch * cfg.seq_len
    info = {
        "base_model": cfg.model,
        "base_model_id": model_id(cfg.model),
        "method": "qat",
        "init": cfg.init,
        "train_tokens": tokens,
        "train_seconds": round(elapsed, 1),
        "data": {k: v for k, v in data_record.items() if k != "cache_hit"},
        "settings": {k: v for k, v in cfg.to_dict().items() if k not in ("out", "model", "keep_checkpoint")},
    }
    _publish_model(student, tokenizer, out, info)
    plot_loss(metrics, out / LOSS_PLOT, title=f"QAT {model_id(cfg.model)} {cfg.bits:g}-bit, loss={cfg.loss}")
    result = {
        "out": str(out),
        "base_model": cfg.model,
        "bits": cfg.bits,
        "quantizer": quantized_modules(student)[0][1].quantizer.name,
        "group_size": cfg.group_size,
        "init": cfg.init,
        "loss": cfg.loss,
        "steps": cfg.steps,
        "train_tokens": tokens,
        "data": data_record.get("source", "data-free"),
        "data_cache_hit": data_record.get("cache_hit"),
        "first_loss": metrics[0]["loss"] if metrics else None,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "train_seconds": round(elapsed, 1),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "resumed_from_step": start_step or None,
        "world_size": ctx.world,
    }
    write_result(out, result)
    if not cfg.keep_checkpoint:
        (out / CHECKPOINT).unlink(missing_ok=True)
    ctx.barrier()
    _teardown(ctx)
    return TrainRun(student, teacher, tokenizer, result)


def write_result(out: Path, result: dict) -> None:
    """Write ``train_result.json`` and mark the run finished in ``train_config.json``."""
    atomic_write(out / RESULT, lambda f: f.write(json.dumps(result, indent=2, default=str).encode()))
    record = json.loads((out / RUN_CONFIG).read_text())
    record["finished"] = True
    atomic_write(out / RUN_CONFIG, lambda f: f.write(json.dumps(record, indent=2).encode()))


def _teardown(ctx: DistContext) -> None:
    if ctx.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
