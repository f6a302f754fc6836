"""Inference on packed weights: load a quantized folder without ever materialising float weights,
generate text, and benchmark prefill / decode speed and resident memory against fp32.

Quantized layers become :class:`~lowbit.packed_linear.PackedLinear` (compiled kernels on the
packed bytes); the embedding and an unquantized output head stay in fp16 as stored, read by
:class:`HalfEmbedding` / :class:`HalfLinear`; norms stay in float32.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import open_weights, pop_quantized_weight
from lowbit.packed_linear import PackedLinear
from lowbit.packing import unpack_codes
from lowbit.quantizers import QuantizedWeight
from lowbit.surgery import set_module


class HalfEmbedding(nn.Module):
    """Embedding table kept in fp16; returns float32 rows."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class HalfLinear(nn.Module):
    """A linear layer whose weight stays in fp16 (e.g. the tied output head); float32 in and out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight).float()
        return y if self.bias is None else y + self.bias


def load_packed(path: str | os.PathLike, verify: bool = True):
    """Load a lowbit quantized folder for inference on packed weights. Returns (model, tokenizer, meta)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta, tensors = open_weights(path, verify)
    hf_config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.eval()
    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules()}
    packed: dict[str, PackedLinear] = {}
    for name, info in meta["layers"].items():
        if "tied_to" in info:
            continue
        qw = pop_quantized_weight(tensors, name, info)
        packed[name] = PackedLinear.from_quantized(qw, tensors.pop(f"{name}.bias", None))
    for name, info in meta["layers"].items():
        target = packed[info.get("tied_to", name)]
        module = model.get_submodule(name)
        if module is in_emb:
            set_module(model, name, PackedEmbedding(target))
        else:
            set_module(model, name, target)
    emb_name = names[in_emb]
    if f"{emb_name}.weight" in tensors:
        emb_w = tensors.pop(f"{emb_name}.weight")
        set_module(model, emb_name, HalfEmbedding(emb_w, in_emb.padding_idx))
        if out_emb is not None and names[out_emb] not in meta["layers"]:
            head_key = f"{names[out_emb]}.weight"
            head_w = tensors.pop(head_key) if head_key in tensors else emb_w  # tied head: share the table
            set_module(model, names[out_emb], HalfLinear(head_w, tensors.pop(f"{names[out_emb]}.bias", None)))
    rest = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise LowbitError(f"{path}: weights do not match the model (missing {still_meta[:3]}, unexpected {unexpected[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer, meta


class PackedEmbedding(nn.Module):
    """Embedding lookups from a PackedLinear's codes (quantized, tied table): dequantizes the rows asked for."""

    def __init__(self, table: PackedLinear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        rows = ids.reshape(-1)
        codes = unpack_codes(t.packed[rows], t.layout, t.in_features)

        def pick(x):
            return x.float()[rows] if x.shape[0] > 1 else x.float().expand(len(rows), -1)

        if t.group_size == 0:  # one scale for the whole table
            step, zero = t.step.float(), t.zero.float()
            vectors = step * (codes.float() - zero)
        else:
            qw = QuantizedWeight(codes, pick(t.step), pick(t.zero), t.group_size, t.n_levels, t.bits, t.quantizer)
            vectors = qw.dequantize()
        return vectors.reshape(*ids.shape, t.in_features)


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc; falls back to peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def module_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer the model holds in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, greedy: bool = True, stream: bool = True) -> str:
    """Generate text from ``prompt`` (greedy by default), streaming tokens to stdout."""
    from transformers import TextStreamer

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=False) if stream else None
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


@torch.inference_mode()
def time_decode(model, prompt_ids: torch.Tensor, new_tokens: int, repeats: int = 1) -> dict:
    """Prefill tokens/s (one forward over the prompt) and decode tokens/s (greedy, KV cache)."""
    from transformers import DynamicCache

    best_prefill, best_decode = 0.0, 0.0
    for _ in range(repeats):
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
        t1 = time.perf_counter()
        token = out.logits[:, -1:].argmax(-1)
        cache = out.past_key_values
        t2 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        t3 = time.perf_counter()
        best_prefill = max(best_prefill, prompt_ids.shape[1] / (t1 - t0))
        best_decode = max(best_decode, new_tokens / (t3 - t2))
    return {"prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode}


def bench(packed_dir: str, reference: str | None = None, prompt_tokens: int = 128, new_tokens: int = 64,
          repeats: int = 2, threads: int | None = None) -> dict:
    """Decode / prefill tokens/s and resident memory of the packed model and of the fp32 reference,
    measured in this one process (packed first, then the reference)."""
    from lowbit.models import load_model

    if threads:
        torch.set_num_threads(threads)
    gc.collect()
    base_rss = resident_bytes()
    model, tokenizer, meta = load_packed(packed_dir)
    gc.collect()
    rss_packed = resident_bytes() - base_rss
    ids = torch.randint(100, 1000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    result = {"model": str(packed_dir), "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens}
    result.update(time_decode(model, ids, new_tokens, repeats))
    result["resident_bytes"] = rss_packed
    result["model_bytes"] = module_bytes(model)
    result["file_bytes"] = meta["weights_bytes"]
    del model
    gc.collect()
    ref_spec = reference or meta.get("info", {}).get("base_model")
    if ref_spec:
        base_rss = resident_bytes()
        ref, _ = load_model(ref_spec)
        gc.collect()
        rss_ref = resident_bytes() - base_rss
        r = time_decode(ref, ids, new_tokens, repeats)
        result["reference"] = ref_spec
        result["reference_decode_tokens_per_s"] = r["decode_tokens_per_s"]
        result["reference_prefill_tokens_per_s"] = r["prefill_tokens_per_s"]
        result["reference_resident_bytes"] = rss_ref
        result["decode_speedup"] = result["decode_tokens_per_s"] / r["decode_tokens_per_s"]
        result["prefill_speedup"] = result["prefill_tokens_per_s"] / r["prefill_tokens_per_s"]
    return result
