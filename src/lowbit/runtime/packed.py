"""Inference on packed weights: load a quantized folder without ever materialising float weights,
generate text, and benchmark prefill / decode speed and resident memory against fp32.

Quantized layers become :class:`~lowbit.runtime.packed_linear.PackedLinear` (compiled kernels on the
packed bytes); the embedding and an unquantized output head stay in fp16 as stored, read by
:class:`HalfEmbedding` / :class:`HalfLinear`; norms stay in float32. A quantized embedding / head
(``quantize_embeddings``) is one PackedLinear (shared when tied): the head runs the matvec kernels
(6-bit codes repacked in u8 at load, which they read), :class:`PackedEmbedding` dequantizes only
the rows looked up.
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
from lowbit.eval.models import check_reference
from lowbit.memory import peak_resident_bytes, resident_bytes, trim_heap
from lowbit.quant.packing import unpack_codes
from lowbit.quant.quantizers import QuantizedWeight
from lowbit.quant.rotation import install_saved_mixes_
from lowbit.quant.surgery import set_module
from lowbit.runtime import kernels
from lowbit.runtime.packed_linear import ACTIVATIONS, KERNEL_MAX_BATCH, PackedLinear, kernel_layout
from lowbit.runtime.resident import measure_resident
from lowbit.store.folder import QuantizedFolder, open_folder
from lowbit.store.stfile import drop_pages


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
        self.bias = None if bias is None else bias.detach().to(torch.float32, copy=True)  # own memory
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            w.dtype == torch.float16
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and w.device.type == "cpu"
            and x.numel() // self.in_features <= KERNEL_MAX_BATCH
            and w.is_contiguous()
            and kernels.available()
        ):  # decode: read the halves in the C kernel (F.linear in fp16 is ~2x slower at batch 1)
            y = kernels.linear_f16(x.reshape(-1, self.in_features).contiguous(), w, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        y = F.linear(x.to(w.dtype), w).float()
        return y if self.bias is None else y + self.bias


TERNARY_LAYOUTS = ("u2", "t5")


def load_packed(path: str | os.PathLike, verify: bool = True, activations: str = "int8", ternary_layout: str = "u2"):
    """Load a lowbit quantized folder for inference on packed weights. Returns (model, tokenizer, meta).

    ``activations``: "int8" (default) rounds each packed layer's input to int8 per 32 features and
    runs integer dot products (llama.cpp's CPU scheme; see benchmarks/results/decode.md for its
    cost in KL), "float" keeps the exact float32 matvec.
    ``ternary_layout``: "u2" (default) runs ternary layers from 2-bit codes (the fast int8 kernels;
    25% more memory than the file), "t5" keeps the file's 1.6-bit base-3 bytes (float kernels only)."""
    if activations not in ACTIVATIONS:
        raise LowbitError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if ternary_layout not in TERNARY_LAYOUTS:
        raise LowbitError(f"ternary_layout must be one of {', '.join(TERNARY_LAYOUTS)}, got {ternary_layout!r}")
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = open_folder(path, verify, mmap=True)  # tensors are views of the mapped file: nothing read twice
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(folder.hf_config(), dtype=torch.float32)
    model.eval()
    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules()}
    packed = {name: _packed_linear(folder, name, activations, ternary_layout) for name in folder.stored_layers()}
    _tables_for_kernels(packed, folder, [names[m] for m in (in_emb, out_emb) if m is not None])
    for name, info in folder.layers.items():
        target = packed[info.get("tied_to", name)]
        set_module(model, name, PackedEmbedding(target) if model.get_submodule(name) is in_emb else target)
    _half_precision_modules(model, folder, names[in_emb], None if out_emb is None else names[out_emb])
    tensors = folder.tensors
    rest = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in tensors.items()}
    tensors.clear()
    install_saved_mixes_(model, rest)
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise LowbitError(
            f"{folder.path}: weights do not match the model (missing {still_meta[:3]}, unexpected {unexpected[:3]})"
        )
    tokenizer = folder.tokenizer()
    del tensors, rest
    trim_heap()  # the converted copies are gone: give their pages back
    return model, tokenizer, folder.meta


def _packed_linear(folder: QuantizedFolder, name: str, activations: str, ternary_layout: str) -> PackedLinear:
    """Layer ``name`` as a PackedLinear, taking its tensors out of ``folder``: the file's packed
    bytes as they are when stored in the layout the kernels read (a view of the mapped file: the
    kernels only read it, and the kernel may page it out and back in), else unpacked and repacked."""
    layer = folder.layer(name, take=True)
    info = layer.info
    layout = ternary_layout if info["n_levels"] == 3 else kernel_layout(info["n_levels"])
    if info["layout"] == layout:  # stored as the kernels read it: no repacking
        bias = None if layer.bias is None else layer.bias.clone()  # scales and bias: small own copies
        zero = info["grid_zero"] if layer.zero is None else layer.zero.clone()
        module = PackedLinear.from_packed(
            layer.qweight, layer.step.clone(), zero, info["shape"][1], info["group_size"], info["layout"],
            info["n_levels"], info["bits"], info["quantizer"], bias,
        )  # fmt: skip
        # its codes are the mapped file's pages: whoever replaces them (the decode loop's fused
        # q/k/v, gate/up copies) may give those pages back (lowbit.store.stfile.drop_pages)
        module.codes_file_backed = module.packed.data_ptr() == layer.qweight.data_ptr()
    else:  # e.g. ternary stored in t5 (1.6 bits), run in u2
        module = PackedLinear.from_quantized(layer.unpack(), layer.bias, layout=layout)
        drop_pages(layer.qweight)  # the file's codes were read once: their pages need not stay resident
    module.activations = activations
    return module


def _half_precision_modules(model: nn.Module, folder: QuantizedFolder, emb_name: str, head_name: str | None) -> None:
    """The embedding ``emb_name``, an unquantized output head ``head_name`` and linears left
    unquantized (include/exclude patterns) keep the file's fp16 (:class:`HalfEmbedding` /
    :class:`HalfLinear`); their tensors leave ``folder.tensors``."""
    tensors, layers = folder.tensors, folder.layers
    if f"{emb_name}.weight" in tensors:
        emb_w = tensors.pop(f"{emb_name}.weight")  # a view of the mapped file (read only)
        set_module(model, emb_name, HalfEmbedding(emb_w, model.get_submodule(emb_name).padding_idx))
        if head_name is not None and head_name not in layers:
            head_key = f"{head_name}.weight"
            head_w = tensors.pop(head_key) if head_key in tensors else emb_w  # tied head: share the table
            set_module(model, head_name, HalfLinear(head_w, tensors.pop(f"{head_name}.bias", None)))
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        if type(module) is nn.Linear and name not in layers and tensors.get(key) is not None \
                and tensors[key].dtype == torch.float16:
            bias = tensors.pop(f"{name}.bias", None)
            set_module(model, name, HalfLinear(tensors.pop(key), bias))


def _tables_for_kernels(packed: dict[str, PackedLinear], folder: QuantizedFolder, table_names: list[str]) -> None:
    """A quantized embedding / output head (``table_names``, tied or not) stored in a layout the C
    kernels do not read (u6: 6-bit codes) is repacked in u8 (same steps and zeros: exact, 8 bits
    per code in memory instead of 6), so that the head runs the (int8) matvec kernels instead of
    dequantizing the whole table in PyTorch every token. A tied pair keeps its one shared copy."""
    for name in table_names:
        info = folder.layers.get(name)
        if info is None:  # kept in high precision
            continue
        owner = info.get("tied_to", name)
        if not kernels.has_kernel(packed[owner].layout):
            packed[owner] = packed[owner].with_layout("u8")


class PackedEmbedding(nn.Module):
    """Embedding lookups from a PackedLinear's codes (quantized, tied table): dequantizes only the
    rows asked for (their codes and scales; the C decoder where it reads the layout)."""

    def __init__(self, table: PackedLinear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        rows = ids.reshape(-1)
        packed = t.packed[rows]
        step = t.step[rows] if t.step.shape[0] > 1 else t.step
        zero = t.zero[rows] if t.zero.shape[0] > 1 else t.zero
        if packed.device.type == "cpu" and kernels.has_kernel(t.layout) and kernels.available():
            weight = kernels.weight_struct(packed, t.layout, t.in_features, t.group_size, step, zero)
            vectors = kernels.dequantize(weight)
        else:
            codes = unpack_codes(packed, t.layout, t.in_features)
            n = len(rows)
            step, zero = step.float().expand(n, -1), zero.float().expand(n, -1)
            if t.group_size == 0:  # one scale for the whole table
                vectors = step * (codes.float() - zero)
            else:
                qw = QuantizedWeight(codes, step, zero, t.group_size, t.n_levels, t.bits, t.quantizer)
                vectors = qw.dequantize()
        return vectors.reshape(*ids.shape, t.in_features)


def module_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer the model holds in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _check_length(model, prompt: int, new: int, prompt_name: str, new_flag: str) -> None:
    """Refuse to run past the model's positions (``max_position_embeddings``)."""
    from lowbit.eval.models import max_positions

    limit = max_positions(model)
    if limit is not None and prompt + new > limit:
        raise LowbitError(
            f"{prompt_name} plus {new_flag} {new} is {prompt + new} tokens, more than the model's {limit} "
            f"positions: shorten the prompt or lower {new_flag}"
        )


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, greedy: bool = True, stream: bool = True,
             engine: str = "auto") -> str:
    """Generate text from ``prompt`` (greedy by default), streaming tokens to stdout.

    ``engine``: "lowbit" (:class:`lowbit.runtime.decoder.Decoder`, greedy only), "transformers"
    (``model.generate``), or "auto": lowbit for greedy decoding of a model it supports."""
    from transformers import TextStreamer

    from lowbit.runtime.decoder import Decoder, resolve_engine

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise LowbitError("the prompt is empty (it has no tokens): pass --prompt with some text")
    _check_length(model, ids.shape[1], max_new_tokens, f"the prompt ({ids.shape[1]} tokens)", "--max-new-tokens")
    streamer = TextStreamer(tokenizer, skip_prompt=False) if stream else None
    engine = "transformers" if engine == "auto" and not greedy else resolve_engine(model, engine)
    if engine == "lowbit" and not greedy:
        raise LowbitError("the lowbit decode loop is greedy only: use --engine transformers with --sample")
    if engine == "lowbit" and greedy:
        decoder = Decoder(model, max_len=ids.shape[1] + max_new_tokens)
        if streamer is not None:
            streamer.put(ids)
        tokens = decoder.generate(
            ids[0], max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            on_token=(lambda tok: streamer.put(torch.tensor([tok]))) if streamer is not None else None,
        )
        if streamer is not None:
            streamer.end()
        return tokenizer.decode(ids[0].tolist() + tokens, skip_special_tokens=True)
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


@torch.inference_mode()
def time_decode(model, prompt_ids: torch.Tensor, new_tokens: int, repeats: int = 1, engine: str = "transformers") -> dict:
    """Prefill tokens/s (one forward over the prompt) and decode tokens/s (greedy, KV cache), with
    the transformers forward or lowbit's :class:`~lowbit.runtime.decoder.Decoder` (``engine``)."""
    from transformers import DynamicCache

    from lowbit.runtime.decoder import Decoder, resolve_engine

    best_prefill, best_decode = 0.0, 0.0
    if resolve_engine(model, engine) == "lowbit":
        decoder = Decoder(model, max_len=prompt_ids.shape[1] + new_tokens + 1)
        for _ in range(repeats):
            decoder.reset()
            t0 = time.perf_counter()
            logits = decoder.forward(prompt_ids[0])
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                logits = decoder.forward(logits.argmax().reshape(1))
            t2 = time.perf_counter()
            best_prefill = max(best_prefill, prompt_ids.shape[1] / (t1 - t0))
            best_decode = max(best_decode, new_tokens / (t2 - t1))
        return {"prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode}
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
          repeats: int = 2, threads: int | None = None, activations: str = "int8", memory: bool = True,
          ternary_layout: str = "u2", engine: str = "auto") -> dict:
    """Decode / prefill tokens/s of the packed model and of the fp32 reference, timed in this one
    process (packed first, then the reference), and the resident memory of each.

    ``resident_bytes``: growth of a fresh process's resident set while it loads the model and
    decodes 24 tokens (see :func:`measure_resident`; transformers maps fp32 weights lazily, so only
    a model that has run shows its full size); ``size_account_bytes``: the bytes the folder stores (what ``lowbit
    eval`` counts), so ``resident_over_account`` near 1 means nothing but the stored bytes was
    materialised. The reference's account is its parameter bytes.

    ``engine`` runs the packed model (see :func:`time_decode`; "auto": lowbit's decode loop where
    it supports the model); the fp32 reference always runs the transformers forward, and, when the
    packed model ran on the lowbit loop, also on it (``reference_lowbit_engine_*``), which
    separates the loop's gain from the packed kernels' gain."""
    from lowbit.eval.models import load_model
    from lowbit.runtime.decoder import resolve_engine

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, meta = load_packed(packed_dir, activations=activations, ternary_layout=ternary_layout)
    _check_length(model, prompt_tokens, new_tokens, f"--prompt-tokens {prompt_tokens}", "--new-tokens")
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab - 1), min(1000, vocab), (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    result = {"model": str(packed_dir), "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "activations": activations, "ternary_layout": ternary_layout}
    engine = resolve_engine(model, engine)
    result["engine"] = engine
    result.update(time_decode(model, ids, new_tokens, repeats, engine=engine))
    result["model_bytes"] = module_bytes(model)
    result["file_bytes"] = meta["weights_bytes"]
    result["size_account_bytes"] = meta["weights_bytes"]
    del model
    gc.collect()
    if memory:
        mem = measure_resident("packed", str(packed_dir), activations, torch.get_num_threads(), ternary_layout, engine)
        result["resident_bytes"] = mem["resident_bytes_after_decode"]
        result["resident_bytes_after_load"] = mem["resident_bytes"]
        result["resident_over_account"] = result["resident_bytes"] / meta["weights_bytes"]
    if reference is None:
        reference = check_reference(meta)
    ref_spec = reference
    if ref_spec:
        ref, _ = load_model(ref_spec)
        r = time_decode(ref, ids, new_tokens, repeats)
        result["reference"] = ref_spec
        result["reference_decode_tokens_per_s"] = r["decode_tokens_per_s"]
        result["reference_prefill_tokens_per_s"] = r["prefill_tokens_per_s"]
        result["reference_size_account_bytes"] = module_bytes(ref)
        if engine == "lowbit":
            r2 = time_decode(ref, ids, new_tokens, repeats, engine="lowbit")
            result["reference_lowbit_engine_decode_tokens_per_s"] = r2["decode_tokens_per_s"]
            result["reference_lowbit_engine_prefill_tokens_per_s"] = r2["prefill_tokens_per_s"]
        del ref
        gc.collect()
        if memory:
            mem = measure_resident("reference", ref_spec, activations, torch.get_num_threads())
            result["reference_resident_bytes"] = mem["resident_bytes_after_decode"]
            result["reference_resident_over_account"] = (
                result["reference_resident_bytes"] / result["reference_size_account_bytes"]
            )
        result["decode_speedup"] = result["decode_tokens_per_s"] / r["decode_tokens_per_s"]
        result["prefill_speedup"] = result["prefill_tokens_per_s"] / r["prefill_tokens_per_s"]
    return result


def _run_tiny_twin(config, engine: str) -> None:
    """Decode a few tokens with a tiny random model of the same architecture (one layer, width 64),
    so that the baseline holds the code pages of the ops a decode runs (about 6 MB of libtorch
    touched on first use), which any model would cost once per process."""
    import copy

    from transformers import AutoModelForCausalLM

    tiny = copy.deepcopy(config)
    for key, value in (("num_hidden_layers", 1), ("hidden_size", 64), ("intermediate_size", 128),
                       ("num_attention_heads", 4), ("num_key_value_heads", 2), ("head_dim", 16), ("vocab_size", 256)):
        if hasattr(tiny, key):
            setattr(tiny, key, value)
    try:
        model = AutoModelForCausalLM.from_config(tiny).eval()
        ids = torch.arange(16)[None]
        if engine == "lowbit":
            from lowbit.runtime.decoder import Decoder

            Decoder(model, max_len=32).generate(ids[0], max_new_tokens=4)
        else:
            from transformers import DynamicCache

            with torch.inference_mode():
                out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
                model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    except Exception:  # an architecture this shrinking does not fit: measure without the warm-up
        pass


def memory_child(kind: str, spec: str, activations: str, threads: int, ternary_layout: str = "u2",
                 engine: str = "transformers") -> dict:
    """Runs in a fresh interpreter (see :func:`measure_resident`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from lowbit.eval.models import NAMED_MODELS, cached_model_dir, load_model

    torch.set_num_threads(threads)
    kernels.load()
    # The baseline includes what any model of this architecture costs once per process (modules
    # imported on first use, about 130 MB for Llama in transformers 5; the code pages of the ops a
    # decode runs) and the tokenizer: an empty (meta) model is built, a tiny random twin decodes a
    # few tokens and a tokenizer is loaded before it is taken.
    if kind == "packed":
        folder = Path(spec)
    elif spec in NAMED_MODELS or not Path(spec).is_dir():
        folder = cached_model_dir(spec)
    else:
        folder = Path(spec)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        AutoModelForCausalLM.from_config(config)
    if (folder / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(folder)
    _run_tiny_twin(config, engine)
    trim_heap()
    baseline = resident_bytes()
    if kind == "packed":
        model, _, _ = load_packed(spec, activations=activations, ternary_layout=ternary_layout)
    else:
        model, _ = load_model(spec)
    trim_heap()
    loaded = resident_bytes()
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab - 1), min(1000, vocab), (1, 16), generator=torch.Generator().manual_seed(0))
    if engine == "lowbit":  # lowbit's decode loop, as `lowbit generate` runs it (KV cache for 2048 tokens)
        from lowbit.runtime.decoder import Decoder

        Decoder(model, max_len=2048).generate(ids[0], max_new_tokens=8)
    else:
        with torch.inference_mode():
            out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
            for _ in range(8):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    trim_heap()
    return {
        "baseline_rss": baseline,
        "resident_bytes": loaded - baseline,
        "resident_bytes_after_decode": resident_bytes() - baseline,
        "peak_rss": peak_resident_bytes(),
        "model_bytes": module_bytes(model),
    }
