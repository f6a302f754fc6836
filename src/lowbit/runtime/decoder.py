"""A lean single-sequence decode loop for Llama-family models (Llama, Qwen2), for the packed runtime.

``transformers``' generic forward costs about 7 ms of Python per token on this CPU for a 30-layer
model (cache objects, masks, hooks, ~1,000 small ops), which is more than the packed matmuls
themselves. :class:`Decoder` runs the same modules (the model's own linears, PackedLinear or
nn.Linear, its embedding, norms weights and rotary tables) with a preallocated KV cache and only
the ops the architecture needs; when every projection is packed, a single-token step runs all
blocks in one C call (``kernels.decode_layers``: RMSNorm, fused q/k/v, RoPE, cache write,
attention, o, fused gate/up, SiLU, down, residuals), leaving only the embedding, final norm and
head to PyTorch. Its logits match the model's own forward up to float rounding
(tested); anything it does not support (other architectures, dynamic RoPE, sliding windows, q/k
norms) is refused with a clear error, and the transformers path stays available
(``engine="transformers"``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime import kernels
from lowbit.runtime.packed_linear import KERNEL_MAX_BATCH, PackedLinear
from lowbit.store.stfile import drop_pages

SUPPORTED_TYPES = ("llama", "qwen2")
ENGINES = ("auto", "lowbit", "transformers")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`Decoder` cannot run ``model`` (None when it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        kind = getattr(cfg, "model_type", type(model).__name__)
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (only silu)"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if "dynamic" in str(rope_type) or "longrope" in str(rope_type):
        return f"RoPE type {rope_type!r} depends on the sequence length"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no model.model.layers / rotary_emb"
    attn = inner.layers[0].self_attn
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "q/k norms"
    return None


def resolve_engine(model: nn.Module, engine: str) -> str:
    """"auto" -> "lowbit" when :class:`Decoder` supports the model, else "transformers"."""
    if engine not in ENGINES:
        raise LowbitError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    reason = unsupported_reason(model)
    if engine == "lowbit" and reason:
        raise LowbitError(f"the lowbit decode loop cannot run this model ({reason}): use --engine transformers")
    if engine == "auto":
        return "transformers" if reason else "lowbit"
    return engine


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    out = F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    mix = getattr(norm, "mix", None)  # a rotated model's final norm (lowbit.quant.rotation.MixedRMSNorm)
    return out if mix is None else out @ mix.to(out.dtype)


@dataclass(frozen=True)
class Projections:
    """Several projections of one input (q/k/v, or gate/up) for the decode steps: one call of a
    fused PackedLinear split into ``sizes`` where they are packed alike, else one call each."""

    fns: tuple[Callable, ...]  # the fused layer's decode_fn alone, or one callable per projection
    sizes: tuple[int, ...] | None  # output widths of the fused call; None: separate calls
    fused: PackedLinear | None  # the fused layer, whose buffers the original layers view
    modules: tuple[nn.Module, ...]  # the projections themselves

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The decode steps (up to ``KERNEL_MAX_BATCH`` rows of ``h``): the kernels called directly."""
        if self.sizes is not None:
            return self.fns[0](h).split(self.sizes, dim=-1)
        return tuple(fn(h) for fn in self.fns)

    def prompt(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Any number of rows (a prompt): the fused layer's forward (one GEMM or kernel call for all
        projections), else each module's."""
        if self.fused is not None:
            return self.fused(h).split(self.sizes, dim=-1)
        return tuple(m(h) for m in self.modules)

    @classmethod
    def of(cls, modules: list[nn.Module]) -> Projections:
        """Fused when every module is a PackedLinear and they concatenate (:meth:`PackedLinear.concat`);
        the originals then become views of the fused buffers, so no byte is duplicated."""
        fused = PackedLinear.concat(modules) if all(isinstance(m, PackedLinear) for m in modules) else None
        if fused is None:
            return cls(tuple(_single(m) for m in modules), None, None, tuple(modules))
        r0 = 0
        for m in modules:  # the originals become views of the fused buffers
            r1 = r0 + m.out_features
            old = m._buffers["packed"]
            for name in ("packed", "step", "bias"):
                if m._buffers[name] is not None:
                    m._buffers[name] = fused._buffers[name][r0:r1]
            if getattr(m, "codes_file_backed", False):  # the file's copy of these codes is not read again
                drop_pages(old)
                m.codes_file_backed = False
            if fused.zero.shape[0] != 1:
                m._buffers["zero"] = fused._buffers["zero"][r0:r1]
            r0 = r1
        return cls((fused.decode_fn(),), tuple(m.out_features for m in modules), fused, tuple(modules))


@dataclass(frozen=True)
class FastLayer:
    """The callables of one decoder block for the decode steps (up to ``KERNEL_MAX_BATCH`` tokens)."""

    qkv: Projections
    o: Callable
    gate_up: Projections
    down: Callable


def _single(module: nn.Module):
    return module.decode_fn() if isinstance(module, PackedLinear) else module


class Decoder:
    """Greedy / step-by-step decoding of one sequence with a preallocated KV cache.

    ``forward(ids)`` appends ``ids`` (1-d LongTensor: a prompt, or one token) to the sequence and
    returns the float32 logits of its last position; ``reset()`` starts a new sequence.
    """

    def __init__(self, model: nn.Module, max_len: int = 2048):
        reason = unsupported_reason(model)
        if reason:
            raise LowbitError(f"the lowbit decode loop cannot run this model ({reason}): use engine='transformers'")
        cfg = model.config
        inner = model.model
        self.model = model
        self.layers = list(inner.layers)
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.head = model.lm_head
        # a quantized head (PackedLinear) called straight on its kernel for one position's logits
        self._head_fn = _single(self.head)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.max_len = int(max_len)
        with torch.inference_mode():
            pos = torch.arange(self.max_len)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        half = self.head_dim // 2
        self.cos = cos[0].float().contiguous()
        # rotate_half(x) * sin == cat(-x2, x1) * sin: fold the sign into sin
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).float().contiguous()
        # per layer: (q, k, v), (gate, up) as single calls where they are packed alike, for the
        # decode steps (up to KERNEL_MAX_BATCH tokens); longer prompts use the modules
        self.fast: list[FastLayer] = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = Projections.of([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = Projections.of([mlp.gate_proj, mlp.up_proj])
            self.fast.append(FastLayer(qkv, _single(attn.o_proj), gate_up, _single(mlp.down_proj)))
        shape = (len(self.layers), self.n_kv, self.max_len, self.head_dim)
        # uninitialised: a position is written before any step reads it, so the pages of a long
        # cache become resident only as the sequence reaches them
        self.k = torch.empty(shape)
        self.v = torch.empty(shape)
        self.pos = 0
        self.c_layers = self._build_c_layers(cfg)

    def _build_c_layers(self, cfg):
        """The C description of every block (``kernels.decode_layers``), when every projection is a
        PackedLinear that the kernels run (q/k/v and gate/up fused; all int8-capable in int8 mode);
        else None and single steps run the PyTorch ops."""
        if not kernels.available():
            return None
        arr = (kernels._Layer * len(self.layers))()
        keep = []
        modes = set()
        for i, (layer, fast) in enumerate(zip(self.layers, self.fast, strict=True)):
            mods = [fast.qkv.fused, layer.self_attn.o_proj, fast.gate_up.fused, layer.mlp.down_proj]
            if not all(isinstance(m, PackedLinear) and m.kernel_runs() for m in mods):
                return None
            structs = []
            for m in mods:
                kw = m.kernel_weight()
                modes.add(m.activations)
                structs.append(kw.struct)
                keep.append(kw)
            ln1 = layer.input_layernorm.weight.detach().float().contiguous()
            ln2 = layer.post_attention_layernorm.weight.detach().float().contiguous()
            keep += [ln1, ln2]
            c = arr[i]
            c.qkv, c.o, c.gate_up, c.down = (ctypes.pointer(w) for w in structs)
            c.ln1, c.ln2 = ln1.data_ptr(), ln2.data_ptr()
            c.kcache, c.vcache = self.k[i].data_ptr(), self.v[i].data_ptr()
            c.hidden, c.nh, c.nkv, c.hd = cfg.hidden_size, self.n_heads, self.n_kv, self.head_dim
            c.inter, c.max_len = layer.mlp.down_proj.in_features, self.max_len
            c.eps1 = layer.input_layernorm.variance_epsilon
            c.eps2 = layer.post_attention_layernorm.variance_epsilon
            c.scale = self.scale
            c.q8 = 1 if layer.mlp.down_proj.activations == "int8" else 0
        if len(modes) != 1:
            return None
        inter = max(c.inter for c in arr)
        hidden, qkv_width = cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim
        self._scratch = torch.empty(2 * hidden + qkv_width + self.n_heads * self.head_dim + 3 * inter + self.max_len)
        self._keep = keep
        return arr

    def reset(self) -> None:
        self.pos = 0

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
        return torch.addcmul(x * cos, swapped, sin)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1)
        t = ids.numel()
        p0, p1 = self.pos, self.pos + t
        if t == 0:
            raise LowbitError("no tokens to decode")
        if p1 > self.max_len:
            raise LowbitError(f"sequence of {p1} tokens exceeds the decoder's max_len={self.max_len}: raise max_len")
        x = self.embed(ids[None]).float()  # (1, t, hidden)
        if t == 1 and self.c_layers is not None:  # every block in one C call
            x = x.reshape(-1).contiguous().clone()
            kernels.decode_layers(self.c_layers, x, p0, self.cos[p0], self.sin[p0], self._scratch)
            self.pos = p1
            return self._logits(_rms(x.view(1, -1), self.norm))
        cos, sin = self.cos[p0:p1], self.sin[p0:p1]
        mask = None
        causal = t > 1 and p0 == 0  # a prompt from an empty cache: plain causal attention
        if t > 1 and p0 > 0:  # new tokens see the cache and causally each other
            mask = torch.ones(t, p1, dtype=torch.bool).tril(diagonal=p0)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        fast = t <= KERNEL_MAX_BATCH
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms(x, layer.input_layernorm)
            block = self.fast[i]
            q, k, v = block.qkv(h.view(t, -1)) if fast else block.qkv.prompt(h.view(t, -1))
            q = q.reshape(t, nh, hd).transpose(0, 1)
            k = k.reshape(t, nkv, hd).transpose(0, 1)
            v = v.reshape(t, nkv, hd).transpose(0, 1)
            q = self._rope(q, cos, sin)
            self.k[i, :, p0:p1] = self._rope(k, cos, sin)
            self.v[i, :, p0:p1] = v
            o = F.scaled_dot_product_attention(
                q[None], self.k[i, None, :, :p1], self.v[i, None, :, :p1], attn_mask=mask, scale=self.scale,
                is_causal=causal, enable_gqa=nkv != nh,
            )
            o = o[0].transpose(0, 1).reshape(t, nh * hd)
            if fast:
                x = x + block.o(o).view(1, t, -1)
                g, u = block.gate_up(_rms(x, layer.post_attention_layernorm).view(t, -1))
                x = x + block.down(F.silu(g).mul_(u)).view(1, t, -1)
            else:
                x = x + attn.o_proj(o[None])
                g, u = block.gate_up.prompt(_rms(x, layer.post_attention_layernorm).view(t, -1))
                x = x + mlp.down_proj(F.silu(g).mul_(u)).view(1, t, -1)
        self.pos = p1
        return self._logits(_rms(x[0, -1:], self.norm))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head on one position's normed hidden state ``h`` (1, hidden): float32 logits (vocab,)."""
        return self._head_fn(h.contiguous())[0].float()

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None, on_token=None) -> list[int]:
        """Greedy continuation of ``ids``; ``on_token(token_id)`` is called for each new token."""
        self.reset()
        logits = self.forward(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            out.append(token)
            if on_token is not None:
                on_token(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            if len(out) == max_new_tokens:
                break
            logits = self.forward(torch.tensor([token]))
        return out
