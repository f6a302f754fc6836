"""Rotations folded into the weights before quantization (QuaRot / SpinQuant-style incoherence).

An orthogonal ``Q`` applied to the residual stream changes no output of an RMSNorm transformer once
each norm's scale is folded into the linears that read it: ``RMSNorm(x Q) = RMSNorm(x) Q``. Every
linear reading the stream becomes ``W Q``, every linear writing it ``Q^T W``, the embedding ``E Q``
(Ashkboos et al. 2024, "QuaRot", arXiv:2404.00456; Liu et al. 2024, "SpinQuant", arXiv:2405.16406).
Inside attention the value and output projections take a per-head rotation ``R2`` (attention mixes
tokens, not head dimensions). The full-precision model computes the same function to rounding; its
weights are spread over all input directions, so outlier columns no longer set a group's step
(Chee et al. 2023, "QuIP"; Tseng et al. 2024, "QuIP#": incoherence processing).

Rotations are randomised Hadamard matrices ``H diag(s) / sqrt(n)`` (``s`` random signs), built for
sizes that are not powers of two (576 = 12 x 12 x 4, 1536 = 12 x 128, 640 = 20 x 32, 5632 = 44 x 128)
from Paley's construction and Kronecker products; a size with no such factorisation gets a random
orthogonal matrix (QR of a Gaussian, Haar-distributed).

:mod:`lowbit.quant.rotation_learn` learns ``R1`` and ``R2`` instead (SpinQuant-style, ``rotation_steps``);
:func:`rotate_model_` folds given rotations as it folds random ones.

A tied output head stays tied: the shared table becomes ``E Q`` and the final norm's scale ``g``,
which sits between the rotated stream and the table, becomes a ``hidden x hidden`` mix
``Q^T diag(g) Q`` applied after the (unit) final RMSNorm (:class:`MixedRMSNorm`; 0.3% of
SmolLM2-135M's embedding bytes instead of a second vocabulary-sized table). An untied head takes the
fold exactly: ``W diag(g) Q``. GGUF has no such mix, so the export writes the tied model with a
separate output table ``E Q M`` in its fallback type. Supported: Llama-style
decoders (Llama, Mistral, Qwen2/3, SmolLM, Phi-3-like split projections) with RMSNorm; refused with a
clear error: LayerNorm models (mean subtraction does not commute) and Gemma's sandwich norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError

# Hadamard orders q + 1 from Paley's first construction (q prime, q = 3 mod 4), used as Kronecker factors.
_PALEY_PRIMES = (3, 11, 19, 43, 59, 67, 83, 107, 131, 139, 163, 179, 211, 227, 251)


def _paley(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 (q prime, q = 3 mod 4) by Paley's construction I."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx.view(1, -1) - idx.view(-1, 1)) % q]  # Q[i, j] = chi(j - i), skew-symmetric
    n = q + 1
    h = torch.empty(n, n, dtype=torch.float64)
    h[0, :] = 1
    h[1:, 0] = -1
    h[1:, 1:] = jacobsthal + torch.eye(q, dtype=torch.float64)
    return h


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``) or None when lowbit cannot build
    one: a power of two times a product of Paley orders (12, 20, 44, ...)."""
    factors: list[torch.Tensor] = []
    rest = n
    for q in _PALEY_PRIMES[1:]:  # 4 = 3 + 1 is a power of two already
        while rest % (q + 1) == 0 and _has_pow2_tail(rest // (q + 1)):
            factors.append(_paley(q))
            rest //= q + 1
    if rest < 1 or rest & (rest - 1):
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(rest.bit_length() - 1):
        h = torch.kron(h, sylvester)
    for f in factors:
        h = torch.kron(h, f)
    return h


def _has_pow2_tail(m: int) -> bool:
    """Whether ``m`` is a power of two times a product of Paley orders (so another factor may be taken)."""
    for q in _PALEY_PRIMES[1:]:
        while m % (q + 1) == 0:
            m //= q + 1
    return m >= 1 and m & (m - 1) == 0


def random_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal ``n x n`` matrix (float64): a randomised Hadamard where one exists."""
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
        return q * torch.sign(torch.diagonal(r)).view(1, -1)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).double() * 2 - 1
    return h * signs.view(1, -1) / math.sqrt(n)


@dataclass
class _Parts:
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Linear
    head_dim: int


def _parts(model: nn.Module) -> _Parts:
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    layers = getattr(inner, "layers", None)
    if inner is None or head is None or layers is None or not hasattr(inner, "norm"):
        raise LowbitError(
            f"rotation needs a Llama-style causal LM (model.layers, model.norm, lm_head); {type(model).__name__} "
            "is not one: quantize without --rotate"
        )
    kind = type(model).__name__
    if "Gemma" in kind or any(hasattr(layer, "pre_feedforward_layernorm") for layer in layers):
        raise LowbitError(f"rotation does not support {kind} (its sandwich norms do not commute with a rotation): "
                          "quantize without --rotate")  # fmt: skip
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if (
            attn is None
            or mlp is None
            or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names)
            or not all(  # noqa: E501
                isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
            )
        ):
            raise LowbitError(f"rotation needs separate q/k/v/o and gate/up/down linears; {kind} has fused or "
                              "renamed projections: quantize without --rotate")  # fmt: skip
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _check_rmsnorm(norm, kind)
    _check_rmsnorm(inner.norm, kind)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return _Parts(inner.embed_tokens, layers, inner.norm, head, head_dim)


def rotation_unsupported(model: nn.Module) -> str | None:
    """Why :func:`rotate_model_` would refuse ``model`` (one line), or None when it can rotate it."""
    try:
        _parts(model)
    except LowbitError as exc:
        return str(exc).split(":")[0]
    return None


def _check_rmsnorm(norm: nn.Module, kind: str) -> None:
    if "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
        raise LowbitError(
            f"rotation needs RMSNorm layers; {kind} uses {type(norm).__name__}: quantize without --rotate"
        )


def _fold_norm_(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.data = (lin.weight.data.double() * g.view(1, -1)).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _read_(lin: nn.Linear, q: torch.Tensor) -> None:
    """``lin`` reads a rotated input: ``W <- W Q``."""
    lin.weight.data = (lin.weight.data.double() @ q).to(lin.weight.dtype)


def _write_(lin: nn.Linear, q: torch.Tensor) -> None:
    """``lin`` writes a rotated output: ``W <- Q^T W``, ``b <- b Q``."""
    lin.weight.data = (q.T @ lin.weight.data.double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.double() @ q).to(lin.bias.dtype)


@torch.no_grad()
def rotate_model_(model: nn.Module, seed: int = 0, r1: torch.Tensor | None = None, r2: torch.Tensor | None = None) -> dict:
    """Fold norm scales and orthogonal rotations (residual ``R1``, per-head ``R2``) into a
    full-precision model in place; the model computes the same function (to float rounding). The
    rotations are random (:func:`random_rotation`, seeded) unless ``r1`` and ``r2`` are given (e.g.
    learned, :mod:`lowbit.quant.rotation_learn`). Returns a record for lowbit.json. Must run before quantization."""
    if getattr(model, "lowbit_config", None) is not None:
        raise LowbitError("rotation must be applied to the full-precision model, before quantization")
    parts = _parts(model)
    hidden = parts.embed.weight.shape[1]
    if (r1 is None) != (r2 is None):
        raise LowbitError("rotate_model_ takes both r1 and r2, or neither (random rotations from the seed)")
    if r1 is None:
        r1, r2 = random_rotations(model, seed)
        kind = {"kind": "randomized-hadamard", "seed": seed}
    else:
        r1, r2 = _check_orthogonal(r1, hidden, "r1"), _check_orthogonal(r2, parts.head_dim, "r2")
        kind = {"kind": "given"}
    return {**kind, **_fold_(model, parts, r1, r2)}


def random_rotations(model: nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual ``R1`` (hidden x hidden) and per-head ``R2`` (head_dim x head_dim) that
    :func:`rotate_model_` folds for ``seed`` (float64)."""
    parts = _parts(model)
    gen = torch.Generator().manual_seed(seed)
    r1 = random_rotation(parts.embed.weight.shape[1], gen)
    return r1, random_rotation(parts.head_dim, gen)


def _check_orthogonal(q: torch.Tensor, n: int, what: str) -> torch.Tensor:
    q = q.detach().to(torch.float64)
    if q.shape != (n, n):
        raise LowbitError(f"{what} must be {n} x {n} for this model, not {tuple(q.shape)}")
    err = (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    if not err <= 1e-6:
        raise LowbitError(f"{what} is not orthogonal (max |Q Q^T - I| = {err:.2g}): pass an orthogonal matrix")
    return q


def _fold_(model: nn.Module, parts: _Parts, r1: torch.Tensor, r2: torch.Tensor) -> dict:
    hidden = parts.embed.weight.shape[1]
    head_weight = parts.head.weight.detach().clone()
    was_tied = parts.head.weight is parts.embed.weight
    parts.embed.weight.data = (parts.embed.weight.data.double() @ r1).to(parts.embed.weight.dtype)
    for layer in parts.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm_(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm_(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _read_(lin, r1)
        _write_(attn.o_proj, r1)
        _write_(mlp.down_proj, r1)
        _rotate_heads_(attn, r2, parts.head_dim)
    g = parts.norm.weight.detach().double()
    if was_tied:  # the table is E Q already; g moves into a mix after the unit final norm
        mix = r1.T @ (g.view(-1, 1) * r1)
        model.model.norm = MixedRMSNorm(hidden, _eps(parts.norm), mix.to(parts.norm.weight.dtype))
    else:
        parts.head.weight.data = ((head_weight.double() * g.view(1, -1)) @ r1).to(head_weight.dtype)
        parts.norm.weight.fill_(1.0)
    return {"residual": hidden, "head_dim": parts.head_dim,
            "head": "tied, final-norm mix" if was_tied else "untied, folded"}  # fmt: skip


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


class MixedRMSNorm(nn.Module):
    """RMSNorm with unit scale followed by a ``hidden x hidden`` matrix: the final norm of a rotated
    model whose head is tied to the embedding (``y = RMSNorm(x) @ mix``, ``mix = Q^T diag(g) Q``)."""

    def __init__(self, hidden: int, eps: float, mix: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps
        self.mix = nn.Parameter(mix.clone() if mix is not None else torch.eye(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h.to(dtype)) @ self.mix.to(dtype)


def install_saved_mixes_(model: nn.Module, keys) -> None:
    """Before loading a saved rotated model: swap each RMSNorm whose ``.mix`` the file holds for a
    :class:`MixedRMSNorm` (the loader then fills it)."""
    for key in keys:
        if not key.endswith(".mix"):
            continue
        owner = key[: -len(".mix")]
        norm = model.get_submodule(owner)
        if isinstance(norm, MixedRMSNorm):
            continue
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                MixedRMSNorm(norm.weight.shape[0], _eps(norm)))  # fmt: skip


def _rotate_heads_(attn: nn.Module, r2: torch.Tensor, head_dim: int) -> None:
    """``v_proj`` output and ``o_proj`` input rotated per head by the same ``r2``."""
    v, o = attn.v_proj, attn.o_proj
    n_kv = v.weight.shape[0] // head_dim
    w = v.weight.data.double().view(n_kv, head_dim, -1)
    v.weight.data = torch.einsum("dk,hdi->hki", r2, w).reshape(v.weight.shape).to(v.weight.dtype)
    if v.bias is not None:
        v.bias.data = (v.bias.data.double().view(n_kv, head_dim) @ r2).reshape(-1).to(v.bias.dtype)
    n_q = o.weight.shape[1] // head_dim
    wo = o.weight.data.double().view(o.weight.shape[0], n_q, head_dim)
    o.weight.data = torch.einsum("ohd,dk->ohk", wo, r2).reshape(o.weight.shape).to(o.weight.dtype)
