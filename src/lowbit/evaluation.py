"""Quality and size: perplexity, KL / top-1 agreement to a reference model, and a byte account.

Perplexity follows METHODS.md section 4: the eval text is tokenized once, cut into
non-overlapping windows of ``seq_len`` tokens, and the mean NLL is taken over every predicted
token (``seq_len - 1`` per window). KL is ``KL(P_ref || P_model)`` per predicted token, averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.io import build_state
from lowbit.surgery import is_linear, output_head_names, quantized_modules


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on token ``windows`` (n, seq_len), plus KL/top-1 vs ``reference``."""
    model.eval()
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    batches = torch.split(windows, batch_size)
    for ids in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
        if reference is not None:
            ref_logp = F.log_softmax(reference(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    out = {
        "perplexity": math.exp(nll_sum / count),
        "nll": nll_sum / count,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "kl_to_reference": kl_sum / count if reference is not None else None,
        "top1_agreement": agree / count if reference is not None else None,
    }
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
