"""Quality and size: perplexity, KL / top-1 agreement to a reference, and a byte account.

Perplexity (docs/methods.md, "Measuring"): the eval text is tokenized once, cut into
non-overlapping windows of ``seq_len`` tokens, and the mean NLL is taken over every predicted
token (``seq_len - 1`` per window). KL is ``KL(P_ref || P_model)`` per predicted token, averaged.

One evaluator serves every caller. The reference's log-probs come from a pluggable
:class:`ReferenceSource`: a model run alongside (:class:`ModelReference`), log-probs cached once for
a sweep (:class:`CachedReference`), or logits another engine produced (:func:`compare_logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.io import build_state
from lowbit.models import check_seq_len
from lowbit.surgery import is_linear, output_head_names, quantized_modules


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs of every position but the last, in float32: (batch, seq - 1, vocab)."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def kl_terms(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Elementwise terms of KL(P_ref || P); summed over the vocabulary they give the KL per token."""
    return ref_logp.exp() * (ref_logp - logp)


class ReferenceSource(Protocol):
    """Where the reference log-probs of batch ``index`` (token ids ``ids``) come from."""

    def log_probs(self, index: int, ids: torch.Tensor) -> torch.Tensor: ...


class ModelReference:
    """The reference model, run on each batch alongside the evaluated model."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    def log_probs(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        return log_probs(self.model(input_ids=ids, use_cache=False).logits)


@dataclass
class CachedReference:
    """The reference's log-probs on fixed windows, computed once and kept in memory.

    ``log_probs_[i]`` is batch ``i``'s log-probs in float32 (windows x (seq_len - 1) x vocab x 4 bytes
    in all: ~3.2 GB for 16k tokens and a 49k vocab). ``result`` is the reference's own evaluation
    (KL 0, top-1 agreement 1).
    """

    windows: torch.Tensor
    batch_size: int
    log_probs_: list[torch.Tensor]
    result: dict

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.log_probs_)

    def log_probs(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        return self.log_probs_[index]


@torch.no_grad()
def cache_reference(
    reference: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> CachedReference:
    """Run ``reference`` once over ``windows`` and keep its log-probs (see :class:`CachedReference`)."""
    kept: list[torch.Tensor] = []
    result = _run(reference.eval(), windows, batch_size, None, progress, "reference", keep=kept)
    result.update(kl_to_reference=0.0, top1_agreement=1.0)
    return CachedReference(windows, batch_size, kept, result)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | ReferenceSource | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on token ``windows`` (n, seq_len), plus KL/top-1 against ``reference``
    (a model, or any :class:`ReferenceSource`; a :class:`CachedReference` fixes windows and batches)."""
    if isinstance(reference, nn.Module):
        reference = ModelReference(reference)
    check_seq_len(model, int(windows.shape[1]), "seq_len")
    if isinstance(reference, CachedReference):
        if reference.windows.shape != windows.shape or not torch.equal(reference.windows, windows):
            raise ValueError("the cached reference was computed on other windows")
        batch_size = reference.batch_size
    model.eval()
    return _run(model, windows, batch_size, reference, progress, "eval")


def _run(model, windows, batch_size, reference, progress, desc, keep=None) -> dict:
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for i, ids in enumerate(tqdm(torch.split(windows, batch_size), desc=desc, unit="batch", disable=not progress)):
        logp = log_probs(model(input_ids=ids, use_cache=False).logits)
        targets = ids[:, 1:]
        nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
        if keep is not None:
            keep.append(logp)
        if reference is not None:
            ref_logp = reference.log_probs(i, ids)
            kl_sum += kl_terms(ref_logp, logp).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    kl = kl_sum / count if reference is not None else None
    _check_finite(desc, nll_sum / count, kl)
    return {
        "perplexity": math.exp(nll_sum / count),
        "nll": nll_sum / count,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "kl_to_reference": kl,
        "top1_agreement": agree / count if reference is not None else None,
    }


def _check_finite(desc: str, nll: float, kl: float | None) -> None:
    """Refuse to report a perplexity or KL that is NaN/inf (or a perplexity that overflows a float)."""
    if math.isfinite(nll) and nll < 709.0 and (kl is None or math.isfinite(kl)):
        return
    what = f"mean NLL {nll}" if not (math.isfinite(nll) and nll < 709.0) else f"KL to the reference {kl}"
    who = "the reference model" if desc == "reference" else "the model"
    raise LowbitError(
        f"{who} gives a non-finite {what}: its weights or scales hold NaN/inf or overflow (e.g. a GGUF with "
        "an inf scale, or a diverged training run); no result is reported. Check the model file or "
        "re-create it from a good full-precision model"
    )


def compare_logits(ref: np.ndarray, other: np.ndarray, ids: list[int] | None = None) -> dict:
    """Two engines' logits for the same positions (positions x vocab), compared in float64:
    logit differences, mean/max KL(ref || other), top-1 agreement, and with the window's token
    ``ids`` each side's summed next-token NLL (``nll_ref``/``nll_other`` over ``len(ids) - 1`` tokens)."""
    ref_t = torch.from_numpy(np.asarray(ref, dtype=np.float64))
    oth_t = torch.from_numpy(np.asarray(other, dtype=np.float64))
    lp, lq = ref_t.log_softmax(-1), oth_t.log_softmax(-1)
    kl = kl_terms(lp, lq).sum(-1)
    out = {
        "max_abs_logit_diff": float((ref_t - oth_t).abs().max()),
        "mean_abs_logit_diff": float((ref_t - oth_t).abs().mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float((ref_t.argmax(-1) == oth_t.argmax(-1)).double().mean()),
        "positions": int(ref_t.shape[0]),
    }
    if ids is not None:
        target = torch.tensor(list(ids[1:]))[:, None]
        out["nll_ref"] = float(-lp[:-1].gather(1, target).sum())
        out["nll_other"] = float(-lq[:-1].gather(1, target).sum())
        out["predicted"] = len(ids) - 1
    return out


def size_account(model: nn.Module) -> dict:
    """Bytes needed to run the model, counted on the tensors exactly as :func:`lowbit.io.save_quantized`
    stores them (packed codes, fp16 steps, zero points, high-precision tensors; tied tensors once).

    ``bits_per_weight`` is over every stored weight of the model; ``bits_per_weight_linear`` over
    the quantized layers (for a full-precision model: the decoder's linear layers).
    """
    tensors, layers = build_state(model)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    q_mods = dict(quantized_modules(model))
    n_params = _count_params(model)
    if q_mods:
        lin_bytes, lin_params = 0, 0
        for name, info in layers.items():
            if "tied_to" in info:
                continue
            lin_params += info["shape"][0] * info["shape"][1]
            for suffix in ("qweight", "step", "zero"):
                t = tensors.get(f"{name}.{suffix}")
                if t is not None:
                    lin_bytes += t.numel() * t.element_size()
    else:
        heads = output_head_names(model)
        lin = [m for n, m in model.named_modules() if is_linear(m) and n not in heads]
        lin_params = sum(m.weight.numel() for m in lin)
        lin_bytes = sum(m.weight.numel() * m.weight.element_size() for m in lin)
    return {
        "total_bytes": int(total),
        "params": int(n_params),
        "bits_per_weight": 8.0 * total / n_params,
        "bits_per_weight_linear": 8.0 * lin_bytes / lin_params if lin_params else None,
        "linear_bytes": int(lin_bytes),
        "linear_params": int(lin_params),
        "other_bytes": int(total - lin_bytes),
    }


def _count_params(model: nn.Module) -> int:
    """Model weights counted once (tied tensors once), quantizer scales excluded."""
    seen, n = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".quantizer." in name or id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return n
