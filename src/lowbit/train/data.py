"""Training data of a QAT run: windows of a text or a token tensor, or text the teacher writes.

In data-free mode (LLM-QAT, Liu et al. 2023) the teacher writes the training text itself: first
token random, the next few greedy, the rest sampled, cached on disk with a JSON record of how it
was made (and of which teacher: :func:`model_fingerprint`), so that the same settings reuse it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.eval.data import describe_text, get_text, tokenize_windows, tokenizer_adds_bos
from lowbit.eval.models import cache_root, model_id
from lowbit.store.fsio import atomic_write

if TYPE_CHECKING:
    from lowbit.train.config import TrainConfig


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 over the model config and every tensor of its state dict (names, shapes, bytes)."""
    h = hashlib.sha1(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokens_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha1(windows.to(torch.int64).numpy().tobytes()).hexdigest()


def _cut_windows(tokens, seq_len: int, max_tokens: int | None, what: str) -> torch.Tensor:
    """A 1-D or 2-D integer token tensor, flattened, cut to ``max_tokens`` and into windows of ``seq_len``."""
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.ndim not in (1, 2):
        raise LowbitError(f"{what} must hold one 1-D or 2-D integer tensor of token ids")
    flat = tokens.reshape(-1).to(torch.long)
    if max_tokens is not None:
        flat = flat[:max_tokens]
    n = flat.numel() // seq_len
    if n == 0:
        raise LowbitError(f"{what} has {flat.numel()} tokens, fewer than one window of seq-len {seq_len}")
    return flat[: n * seq_len].view(n, seq_len)


def windows_from_file(path: str, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """A ``.pt`` file holding a 1-D or 2-D integer token tensor, cut into windows of ``seq_len``."""
    try:
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise LowbitError(f"cannot read token file {path}: {exc}") from exc
    return _cut_windows(tokens, seq_len, max_tokens, path)


def _record(windows: torch.Tensor, **record) -> dict:
    return {**record, "tokens": int(windows.numel()), "tokens_sha1": tokens_fingerprint(windows)}


def training_windows(cfg: TrainConfig, tokenizer, data: str | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Windows (n, seq_len) of ``data`` (default ``cfg.data``: a text name or file, or a ``.pt``
    token file; or a token tensor) and a record of where they came from."""
    data = cfg.data if data is None else data
    if isinstance(data, torch.Tensor):
        windows = _cut_windows(data, cfg.seq_len, cfg.data_tokens, "the token tensor")
        return windows, _record(windows, kind="tokens", source="tensor")
    if data.endswith(".pt"):
        windows = windows_from_file(data, cfg.seq_len, cfg.data_tokens)
        return windows, _record(windows, kind="tokens", source=data)
    if tokenizer is None:
        raise LowbitError(f"reading text {data!r} needs a tokenizer: the model folder has none")
    # Windows start with BOS where the tokenizer adds one, as evaluation and calibration windows do
    # (lowbit.ptq.methods.calibration_windows): the student trains on the inputs it is scored on.
    windows = tokenize_windows(tokenizer, get_text(data), cfg.seq_len, max_tokens=cfg.data_tokens,
                               bos=tokenizer_adds_bos(tokenizer))
    return windows, _record(windows, kind="text", source=data, description=describe_text(data))


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


def _data_free_recipe(cfg: TrainConfig, fingerprint: str) -> dict:
    """What determines the teacher-written tokens; its hash names the cache files."""
    return {
        "kind": "data-free",
        "teacher_sha1": fingerprint,
        "n_sequences": -(-cfg.data_free // cfg.seq_len),
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "first_token": cfg.first_token,
        "greedy_tokens": cfg.greedy_tokens,
        "sampling": "multinomial, temperature 1, no top-k",
        "gen_batch": cfg.gen_batch,
    }


def data_free_windows(
    teacher: nn.Module, tokenizer, cfg: TrainConfig, fingerprint: str, progress: bool = True, write: bool = True
) -> tuple[torch.Tensor, dict]:
    """The teacher-written training tokens for ``cfg``, read from the cache if the same settings
    were asked before, else generated and cached (``.pt`` tensor + ``.json`` record)."""
    recipe = _data_free_recipe(cfg, fingerprint)
    n_sequences = recipe["n_sequences"]
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
    what = f"the data-free token cache ({n_sequences} x {cfg.seq_len} tokens)"
    check_disk_space(folder, needed, what)
    t0 = time.time()
    first = first_token_ids(teacher, tokenizer, cfg.first_token)
    windows = generate_tokens(
        teacher, n_sequences, cfg.seq_len, cfg.seed, first, cfg.greedy_tokens, cfg.gen_batch, progress
    )
    record = {
        **_record(windows, **recipe, teacher=model_id(cfg.model)),
        "generate_seconds": round(time.time() - t0, 2),
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    check_disk_space(folder, needed, what)
    atomic_write(tensor_path, lambda f: torch.save(windows.to(torch.int32), f))
    atomic_write(record_path, json.dumps(record, indent=2))
    return windows, {**record, "cache": str(tensor_path), "cache_hit": False}
