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
from lowbit.eval.models import check_seq_len
from lowbit.quant.surgery import is_linear, output_head_names, quantized_modules
from lowbit.store.folder import build_state


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs of every position but the last, in float32: (batch, seq - 1, vocab).

    Normalised in place, one sequence at a time, when ``logits`` are already float32 (the caller
    hands over a model output it does not keep): a batch of 4 x 512 positions over a 49k
    vocabulary is 400 MB, and an out-of-place log-softmax would hold two of them."""
    out = logits[:, :-1]
    if out.dtype != torch.float32:
        out = out.float()
    for row in out:
        row.copy_(F.log_softmax(row, dim=-1))
    return out


def kl_terms(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Elementwise terms of KL(P_ref || P); summed over the vocabulary they give the KL per token."""
    return ref_logp.exp() * (ref_logp - logp)


class ReferenceSource(Protocol):
    """Where the reference log-probs of batch ``index`` (token ids ``ids``) come from. A source may
    also define ``compare(index, ids, logp) -> (kl_sum, agreeing, kl_error_bound_sum | None)`` (as
    :class:`CachedReference` with ``top_k`` does) and a ``mode`` string, recorded as ``reference_mode``."""

    def log_probs(self, index: int, ids: torch.Tensor) -> torch.Tensor: ...


class ModelReference:
    """The reference model, run on each batch alongside the evaluated model (nothing is kept)."""

    mode = "model-alongside"

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    def log_probs(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        return log_probs(self.model(input_ids=ids, use_cache=False).logits)


@dataclass
class TopKLogProbs:
    """One batch of a reference's next-token log-probs reduced to the ``k`` largest per position
    (``values`` descending, their token ``indices``) and ``log_tail``, the log of the mass of the rest."""

    values: torch.Tensor  # (batch, seq - 1, k) float32
    indices: torch.Tensor  # (batch, seq - 1, k) int32
    log_tail: torch.Tensor  # (batch, seq - 1) float32

    @classmethod
    def of(cls, logp: torch.Tensor, k: int) -> TopKLogProbs:
        values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
        log_tail = torch.logsumexp(logp.scatter(-1, indices, float("-inf")), dim=-1)
        return cls(values, indices.int(), log_tail)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.log_tail))

    def kl(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: the KL of the model's full ``logp`` against this summary, and a bound on its
        error (:class:`CachedReference`, ``top_k``)."""
        idx = self.indices.long()
        head = (self.values.exp() * (self.values - logp.gather(-1, idx))).sum(-1)
        rest = logp.scatter(-1, idx, float("-inf"))
        log_q_tail = torch.logsumexp(rest, dim=-1)
        log_q_min = logp.scatter(-1, idx, float("inf")).amin(-1)
        p_tail = self.log_tail.exp()
        tail = torch.where(p_tail > 0, p_tail * (self.log_tail - log_q_tail), torch.zeros_like(p_tail))
        log_p_max = torch.clamp(self.values[..., -1] - self.log_tail, max=0.0)  # of the tail, renormalised
        bound = torch.where(
            p_tail > 0, p_tail * torch.clamp(log_p_max - (log_q_min - log_q_tail), min=0.0), torch.zeros_like(p_tail)
        )
        return head + tail, bound


@dataclass
class CachedReference:
    """The reference's log-probs on fixed windows, computed once and kept in memory.

    ``log_probs_[i]`` is batch ``i``'s log-probs in float32 (windows x (seq_len - 1) x vocab x 4 bytes
    in all: ~3.2 GB for 16k tokens and a 49k vocab). ``result`` is the reference's own evaluation
    (KL 0, top-1 agreement 1).

    With ``top_k`` (:func:`cache_reference`) each position keeps only its ``k`` largest log-probs and
    the log of the remaining mass (:class:`TopKLogProbs`: ``8 k + 4`` bytes instead of ``4 vocab``,
    516 bytes for k = 64). Top-1 agreement and the model's NLL stay exact; KL becomes the KL of the
    two distributions coarse-grained to the k reference tokens plus one "rest" bucket,
    ``KL_k = sum_{v in K} p_v log(p_v / q_v) + P_T log(P_T / Q_T)`` (``P_T``, ``Q_T``: the reference's
    and the model's mass outside K). Its error, per position, is bounded both ways:

        0 <= KL - KL_k = P_T * KL(p~ || q~) <= P_T * log(max p~ / min q~)

    where ``p~``, ``q~`` are the two distributions restricted to the tokens outside K and
    renormalised (the log-sum inequality gives the lower end; a mean of log-ratios is at most its
    largest term the upper). ``max p~ <= p_(k) / P_T`` is known from the cache and ``min q~`` from the
    evaluated model, so :func:`evaluate` reports the mean of this bound as ``kl_error_bound``: the
    exact KL lies in ``[kl_to_reference, kl_to_reference + kl_error_bound]``.
    """

    windows: torch.Tensor
    batch_size: int
    log_probs_: list[torch.Tensor | TopKLogProbs]
    result: dict
    top_k: int | None = None

    @property
    def mode(self) -> str:
        return "cached-full" if self.top_k is None else f"cached-top{self.top_k}"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes if isinstance(t, TopKLogProbs) else t.numel() * t.element_size() for t in self.log_probs_)

    def log_probs(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        if self.top_k is not None:
            raise ValueError("a top-k reference cache keeps no full log-probs: evaluate compares through compare()")
        return self.log_probs_[index]

    def compare(self, index: int, ids: torch.Tensor, logp: torch.Tensor) -> tuple[float, int, float | None]:
        kept = self.log_probs_[index]
        if not isinstance(kept, TopKLogProbs):
            return _compare_full(kept, logp)
        kl, agree, bound = 0.0, 0, 0.0
        for b in range(logp.shape[0]):  # a sequence at a time: kl() makes several vocabulary-sized temporaries
            part = TopKLogProbs(kept.values[b : b + 1], kept.indices[b : b + 1], kept.log_tail[b : b + 1])
            kl_b, bound_b = part.kl(logp[b : b + 1])
            kl, bound = kl + kl_b.sum().item(), bound + bound_b.sum().item()
            agree += (part.indices[..., 0].long() == logp[b : b + 1].argmax(-1)).sum().item()
        return kl, agree, bound


@torch.no_grad()
def cache_reference(
    reference: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, top_k: int | None = None
) -> CachedReference:
    """Run ``reference`` once over ``windows`` and keep its log-probs (see :class:`CachedReference`):
    all of them, or with ``top_k`` the ``k`` largest per position and the rest's mass."""
    if top_k is not None and top_k < 1:
        raise LowbitError(f"top_k must be a positive number of tokens, not {top_k}")
    kept: list = []
    keep = kept.append if top_k is None else (lambda logp: kept.append(TopKLogProbs.of(logp, top_k)))
    result = _run(reference.eval(), windows, batch_size, None, progress, "reference", keep=keep)
    result.update(kl_to_reference=0.0, top1_agreement=1.0, reference_mode="self")
    return CachedReference(windows, batch_size, kept, result, top_k)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | ReferenceSource | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on token ``windows`` (n, seq_len), plus KL/top-1 against ``reference``
    (a model, run batch by batch alongside, or any :class:`ReferenceSource`; a
    :class:`CachedReference` fixes windows and batches). Only one batch's log-probs are alive at a time."""
    if isinstance(reference, nn.Module):
        reference = ModelReference(reference)
    check_seq_len(model, int(windows.shape[1]), "seq_len")
    if isinstance(reference, CachedReference):
        if reference.windows.shape != windows.shape or not torch.equal(reference.windows, windows):
            raise ValueError("the cached reference was computed on other windows")
        batch_size = reference.batch_size
    model.eval()
    return _run(model, windows, batch_size, reference, progress, "eval")


def _compare_full(ref_logp: torch.Tensor, logp: torch.Tensor) -> tuple[float, int, None]:
    """KL sum and top-1 agreements of one batch, a sequence at a time (temporaries of one sequence)."""
    kl, agree = 0.0, 0
    for ref_row, row in zip(ref_logp, logp, strict=True):
        kl += kl_terms(ref_row, row).sum().item()
        agree += (ref_row.argmax(-1) == row.argmax(-1)).sum().item()
    return kl, agree, None


def _run(model, windows, batch_size, reference, progress, desc, keep=None) -> dict:
    nll_sum, kl_sum, agree, count, bound_sum = 0.0, 0.0, 0, 0, None
    for i, ids in enumerate(tqdm(torch.split(windows, batch_size), desc=desc, unit="batch", disable=not progress)):
        logp = log_probs(model(input_ids=ids, use_cache=False).logits)
        targets = ids[:, 1:]
        nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
        if keep is not None:
            keep(logp)
        if reference is not None:
            compare = getattr(reference, "compare", None)
            kl, agreeing, bound = compare(i, ids, logp) if compare else _compare_full(reference.log_probs(i, ids), logp)
            kl_sum, agree = kl_sum + kl, agree + agreeing
            bound_sum = None if bound is None else (bound_sum or 0.0) + bound
        del logp
    kl = kl_sum / count if reference is not None else None
    _check_finite(desc, nll_sum / count, kl)
    result = {
        "perplexity": math.exp(nll_sum / count),
        "nll": nll_sum / count,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "kl_to_reference": kl,
        "top1_agreement": agree / count if reference is not None else None,
        "reference_mode": getattr(reference, "mode", "external") if reference is not None else None,
    }
    if bound_sum is not None:
        result["kl_error_bound"] = bound_sum / count
    return result


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
    """Bytes needed to run the model, counted on the tensors exactly as :func:`lowbit.store.folder.save_quantized`
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
