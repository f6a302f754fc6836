"""Learned rotations (SpinQuant-style, weight-only): ``R1`` and ``R2`` optimised on calibration text.

SpinQuant (Liu et al. 2024, arXiv:2405.16406) keeps the rotations of :mod:`lowbit.quant.rotation` but learns
them: the quantized network's loss is a function of the rotations, which stay orthogonal under a Cayley
parametrization. lowbit's version, for weight-only quantization:

* **Start**: the randomised Hadamard ``R1_0``, ``R2_0`` that :func:`~lowbit.quant.rotation.rotate_model_` folds
  for the seed; ``R = R_0 (I - A)^-1 (I + A)`` with ``A = (S - S^T) / sqrt(n)`` skew-symmetric, ``S``
  trainable and zero at first, so step 0 is the random rotation exactly. The ``1/sqrt(n)`` keeps one Adam
  step's turn of the rotation about the same for hidden sizes 64 and 2048.
* **Forward**: every decoder linear's rotated weight is computed on the fly from the full-precision
  weights (norm scales folded as ``rotate_model_`` folds them), fake-quantized on the config's own grid
  (ParetoQ's SEQ at 2 bits, LSQ at 3/4, or the ``--quantizer`` asked for; per layer, ``--override`` and
  ``--exclude`` honoured) with the grid's initial abs-max (or min-max) scales, no MSE clip search, STE
  rounding and LSQ-form gradients through the scales; the model runs with those weights
  (``torch.func.functional_call``). Only ``S1`` and ``S2`` train; the model's weights stay frozen.
* **Loss**: the KL divergence of the fake-quantized model's next-token distribution from the
  full-precision model's, per token (SpinQuant uses the cross-entropy on the text; the KL is what lowbit
  reports, and it asks the rotation to keep the full-precision function rather than fit the few
  calibration windows). Adam, learning rate decayed linearly to 0; about 2048 tokens per step (SpinQuant's
  batch), cycling through the calibration windows.
* **Result**: the mean loss on the first calibration windows with the start and the learned rotations;
  the learned ones are kept only when they lower it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.quant.quantizers import Quantizer, check_group_size, group_view, make_quantizer, ungroup
from lowbit.quant.rotation import _parts, random_rotations, rotate_model_

TOKENS_PER_STEP = 2048  # SpinQuant trains on one window of 2048 tokens per step
EVAL_WINDOWS = 4  # windows scored before and after learning
SEARCH_EVERY = 10  # steps between clip searches (the scales follow the weights in between)
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass
class LearnedRotation:
    r1: torch.Tensor  # hidden x hidden, float64, orthogonal
    r2: torch.Tensor  # head_dim x head_dim, float64, orthogonal
    record: dict  # for lowbit.json: steps, learning rate, loss before and after


def cayley(s: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``(I - A)^-1 (I + A)`` of ``A = (S - S^T) / sqrt(n)`` (the identity at ``S = 0``)."""
    n = s.shape[0]
    a = (s - s.T) / math.sqrt(n)
    eye = torch.eye(n, dtype=s.dtype)
    return torch.linalg.solve(eye - a, eye + a)


def fake_quantize(quantizer: Quantizer, w: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` on the quantizer's grid with its initial scales from ``w`` itself (abs-max or min-max per
    group) times ``ratio`` (per group, from a clip search; 1 without), differentiable: STE rounding,
    LSQ-form gradients through the scales."""
    wg, mask, g = group_view(w, quantizer.group_size)
    alpha, zero = quantizer.init_alpha(wg, mask)
    alpha = alpha.clamp_min(1e-8)
    if ratio is not None:
        alpha = alpha * ratio
    rows = wg.shape[0] * wg.shape[1]
    q = quantizer.fake_quantize_with(wg.reshape(rows, g), alpha.reshape(rows, 1), zero.reshape(rows, 1))
    return ungroup(q.reshape(wg.shape), w.shape)


@torch.no_grad()
def clip_ratio(quantizer: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """Per group, the factor on the initial scale that the MSE clip search chooses (as RTN and GPTQ do)."""
    wg, mask, _ = group_view(w.float(), quantizer.group_size)
    alpha, _ = quantizer.init_alpha(wg, mask)
    searched = make_quantizer(quantizer.bits, quantizer.name, quantizer.group_size)
    searched.initialize(w, search="mse")
    return searched.alpha.detach().unsqueeze(-1) / alpha.clamp_min(1e-8)


class RotatedSurrogate:
    """The rotated (and fake-quantized) model as a function of ``(R1, R2)``, from frozen fp weights."""

    def __init__(self, model: nn.Module, config):
        parts = _parts(model)
        self.inner, self.head_dim = model.model, parts.head_dim
        names = {m: n for n, m in model.named_modules()}
        self.embed = parts.embed.weight.detach().float()
        self.head = parts.head.weight.detach().float()
        self.head_bias = None if parts.head.bias is None else parts.head.bias.detach().float()
        self.g = parts.norm.weight.detach().float()
        self.units = {f"{names[n]}.weight".removeprefix("model."): torch.ones_like(n.weight, dtype=torch.float32)
                      for n in self._norms(parts)}  # fmt: skip
        self.search, self.ratios = config.scale_search, {}
        self.linears: list[tuple[str, str, torch.Tensor, torch.Tensor | None, Quantizer | None]] = []
        for layer in parts.layers:
            scales = {"self_attn": layer.input_layernorm.weight, "mlp": layer.post_attention_layernorm.weight}
            for role in READERS + WRITERS:
                lin = layer.get_submodule(role)
                w = lin.weight.detach().float()
                if role in READERS:  # the norm's scale folded, as rotate_model_ folds it
                    w = w * scales[role.split(".")[0]].detach().float().view(1, -1)
                bias = None if lin.bias is None else lin.bias.detach().float()
                self.linears.append((names[lin].removeprefix("model."), role, w, bias, _quantizer(config, names[lin], w)))

    @staticmethod
    def _norms(parts) -> list[nn.Module]:
        return [n for layer in parts.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [
            parts.norm
        ]

    def _rotated(self, role: str, w: torch.Tensor, bias, r1: torch.Tensor, r2: torch.Tensor):
        hd = self.head_dim
        if role in READERS:
            w = w @ r1
        else:
            w = r1.T @ w
            bias = None if bias is None else bias @ r1
        if role == "self_attn.v_proj":
            n_kv = w.shape[0] // hd
            w = torch.einsum("dk,hdi->hki", r2, w.view(n_kv, hd, -1)).reshape(w.shape)
            bias = None if bias is None else (bias.view(n_kv, hd) @ r2).reshape(-1)
        elif role == "self_attn.o_proj":
            w = torch.einsum("ohd,dk->ohk", w.view(w.shape[0], -1, hd), r2).reshape(w.shape)
        return w, bias

    @torch.no_grad()
    def search_scales_(self, r1: torch.Tensor, r2: torch.Tensor) -> None:
        """Fix each quantized linear's clip ratios for the rotated weights (``scale_search="mse"``); the
        scales then follow the weights as the rotation moves, until the next search."""
        if self.search != "mse":
            return
        for name, role, w, bias, quantizer in self.linears:
            if quantizer is not None:
                self.ratios[name] = clip_ratio(quantizer, self._rotated(role, w, bias, r1, r2)[0])

    def logits(self, ids: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Next-token logits of the model rotated by ``r1``, ``r2`` (float32), its linears fake-quantized
        unless ``quantize`` is False (then the full-precision function, to float rounding)."""
        params = dict(self.units)
        for name, role, w, bias, quantizer in self.linears:
            w, bias = self._rotated(role, w, bias, r1, r2)
            quantized = quantize and quantizer is not None
            params[f"{name}.weight"] = fake_quantize(quantizer, w, self.ratios.get(name)) if quantized else w
            if bias is not None:
                params[f"{name}.bias"] = bias
        embeds = F.embedding(ids, self.embed) @ r1
        out = torch.func.functional_call(self.inner, params, (), {"inputs_embeds": embeds, "use_cache": False},
                                         strict=False)  # fmt: skip
        return F.linear((out.last_hidden_state @ r1.T) * self.g, self.head, self.head_bias)


def _quantizer(config, name: str, w: torch.Tensor) -> Quantizer | None:
    spec = config.spec_for(name)
    if spec is None:
        return None
    check_group_size(spec.group_size, w.shape[1])
    return make_quantizer(spec.bits, spec.quantizer, spec.group_size)


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(logits.float(), -1).flatten(0, -2)
    return F.kl_div(logq, ref_logp.flatten(0, -2), log_target=True, reduction="batchmean")


@torch.no_grad()
def _reference(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(ids).logits.float(), -1)


@torch.no_grad()
def _mean_kl(model, surrogate, windows, r1, r2) -> float:
    return sum(_kl(_reference(model, w[None]), surrogate.logits(w[None], r1, r2)).item() for w in windows) / len(windows)


def learn_rotation(model: nn.Module, config, windows: torch.Tensor, steps: int, lr: float = 0.01, seed: int = 0,
                   progress: bool = False) -> LearnedRotation:  # fmt: skip
    """Learn ``R1`` and ``R2`` for ``model`` (full precision, left unchanged) so that the model rotated by
    them and quantized as ``config`` says stays close to the full-precision one on ``windows`` (a
    LongTensor of calibration windows, :func:`lowbit.ptq.methods.calibration_windows`); ``steps`` Adam steps
    from the random rotation of ``seed``. Fold the result with ``rotate_model_(model, r1=..., r2=...)``."""
    if not isinstance(steps, int) or steps < 0:
        raise LowbitError(f"rotation steps must be an integer >= 0, not {steps!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise LowbitError(f"rotation learning rate must be a positive number, not {lr!r}")
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise LowbitError("learn_rotation needs calibration windows shaped (n, seq_len): use calibration_windows")
    r1_64, r2_64 = random_rotations(model, seed)
    r1_0, r2_0 = r1_64.float(), r2_64.float()
    surrogate = RotatedSurrogate(model, config)
    s1 = torch.zeros_like(r1_0, requires_grad=True)
    s2 = torch.zeros_like(r2_0, requires_grad=True)
    scored = windows[:EVAL_WINDOWS]
    surrogate.search_scales_(r1_0, r2_0)
    before = _mean_kl(model, surrogate, scored, r1_0, r2_0)
    batch = max(1, min(len(windows), TOKENS_PER_STEP // windows.shape[1]))
    opt = torch.optim.Adam([s1, s2], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / max(steps, 1))
    losses = []
    bar = tqdm(range(steps), desc="learning the rotation", disable=not progress)
    for step in bar:
        r1, r2 = r1_0 @ cayley(s1), r2_0 @ cayley(s2)
        if step and step % SEARCH_EVERY == 0:
            surrogate.search_scales_(r1.detach(), r2.detach())
        ids = windows[(torch.arange(batch) + step * batch) % len(windows)]
        loss = _kl(_reference(model, ids), surrogate.logits(ids, r1, r2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    with torch.no_grad():
        r1, r2 = r1_64 @ cayley(s1.detach().double()), r2_64 @ cayley(s2.detach().double())
        surrogate.search_scales_(r1.float(), r2.float())
        after = _mean_kl(model, surrogate, scored, r1.float(), r2.float()) if steps else before
    kept = "learned" if after < before else "start (learning did not lower the loss)" if steps else "start (0 steps)"
    if kept != "learned":
        r1, r2 = r1_64, r2_64
    record = {"start": "randomized-hadamard", "seed": seed, "steps": steps, "lr": lr, "optimizer": "adam, linear decay",
              "windows": len(windows), "seq_len": windows.shape[1], "windows_per_step": batch,
              "loss": f"KL(fp || rotated fake-quant, scale search {config.scale_search}) per token, "
                      f"mean of the first {len(scored)} calibration windows",
              "loss_before": before, "loss_after": after, "kept": kept,
              "step_losses": [losses[0], losses[-1]] if losses else []}  # fmt: skip
    return LearnedRotation(r1, r2, record)


def rotate_for_(model: nn.Module, config, calib=None, progress: bool = False) -> dict | None:
    """Rotate ``model`` once if ``config.rotate`` asks (every method calls this before its first look
    at the weights); the record is kept on ``model.lowbit_rotation`` and saved in lowbit.json.

    With ``config.rotation_steps`` > 0 the rotation is learned first (:func:`learn_rotation`)
    on ``calib``: calibration windows (a LongTensor as :func:`lowbit.ptq.methods.calibration_windows` returns) or a
    function returning them (called only when the rotation is learned here)."""
    if not getattr(config, "rotate", False):
        return None
    record = getattr(model, "lowbit_rotation", None)
    if record is not None:
        return record
    steps = getattr(config, "rotation_steps", 0)
    if steps:
        if calib is None:
            raise LowbitError(
                f"rotation_steps {steps} learns the rotation on calibration text, which this method does not read "
                "(RTN): use --method gptq, budget or auto, or in Python call lowbit.quant.rotation_learn.rotate_for_(model, "
                "config, calib=calibration_windows(tokenizer, ...)) before quantizing"
            )
        windows = calib() if callable(calib) else calib
        learned = learn_rotation(model, config, windows, steps, lr=config.rotation_lr, progress=progress)
        record = {**learned.record, **rotate_model_(model, r1=learned.r1, r2=learned.r2)}
        record["kind"] = "learned"
    else:
        record = rotate_model_(model)
    model.lowbit_rotation = record
    return record
