"""Block-wise distillation of a quantized model: Block-AP (EfficientQAT, Chen et al. 2024, arXiv:2407.11062).

``BlockAP().apply(model, config, tokenizer)`` starts from a quantized model (the one passed in when it
is already quantized, e.g. by the byte-budget planner, else GPTQ or RTN under ``config``) and trains
one decoder block at a time: the block's latent weights and its quantizers' step sizes (and min-max
zero points) minimise the mean squared error between the quantized block's output on the quantized
prefix's hidden states and the full-precision block's output on the full-precision hidden states
(docs/methods.md, "Block-AP"). After each block its weights are snapped to the grid and its steps
made fp16-exact, so the model evaluates exactly as it will be saved. With ``work_dir`` the run
resumes bit for bit after a kill at any block and step (:mod:`lowbit.train.blockap_state`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.options import option, parse_duration, parse_positive_int
from lowbit.ptq.blocks import block_output, capture_block_inputs, find_decoder_layers
from lowbit.ptq.methods import calibration_windows, method_settings
from lowbit.quant.quantizers import round_ste
from lowbit.quant.surgery import QuantConfig, QuantizedLinear, quantize_model, quantized_modules
from lowbit.train.blockap_state import Streams, WorkDir, clone_state, model_digest

MIN_LR_FACTOR = 20  # the cosine schedule ends at lr / 20, as EfficientQAT's Block-AP code does
# settings that change where or how often state is kept, not the result
_NOT_IN_FINGERPRINT = ("work_dir", "save_every", "cache_dir", "max_cache_gb")
PROBE_STEPS = 3  # steps run on the first block before fitting a time budget (the first, warm-up, is not timed)


@dataclass(frozen=True)
class BlockAP:
    """Block-AP (EfficientQAT, Chen et al. 2024): train each quantized decoder block's weights and step
    sizes to reproduce the full-precision block's outputs, on calibration windows of ``calib``."""

    name: ClassVar[str] = "blockap"
    kind: ClassVar[str] = "post-training"

    init: str = field(
        default="gptq",
        metadata={"help": "start point when the model is not quantized yet", "choices": ("gptq", "rtn")},
    )
    calib: str = field(default="wiki-train", metadata={"help": "calibration text: wiki-train, news or a text file"})
    calib_tokens: int = field(default=65536, metadata={"help": "calibration tokens", "parse": parse_positive_int})
    seq_len: int = field(default=512, metadata={"help": "calibration window length", "parse": parse_positive_int})
    sample: str = field(
        default="random",
        metadata={"help": "calibration windows: the first calib_tokens of the text, or random windows of all of it",
                  "choices": ("first", "random")},
    )
    seed: int = field(default=0, metadata={"help": "seed of the calibration sample and the training order"})
    epochs: int = field(default=2, metadata={"help": "passes over the calibration windows per block"})
    batch_size: int = field(default=4, metadata={"help": "windows per optimizer step", "parse": parse_positive_int})
    lr: float = field(
        default=0.03,
        metadata={"help": "AdamW learning rate of the latent weights, in units of each layer's mean quantization step"},
    )
    lr_scale: float = field(
        default=0.002,
        metadata={"help": "AdamW learning rate of the step sizes, relative to each layer's mean step size "
                  "(min-max zero points: in code levels); 0 keeps them fixed"},
    )
    loss: str = field(
        default="mse",
        metadata={"help": "block objective: mse (EfficientQAT's, on the raw block outputs) or normed (the outputs as "
                  "the next block reads them, each token through the next norm, so no token dominates)",
                  "choices": ("normed", "mse")},
    )
    check_windows: int = field(
        default=0,
        metadata={"help": "hold this many calibration windows out of training and measure each block's error before "
                  "and after (the revert test) on them alone; 0: on every (training) window"},
    )
    schedule: str = field(
        default="cosine", metadata={"help": "learning-rate schedule within a block (cosine: down to lr/20)",
                                    "choices": ("cosine", "constant")},
    )
    work_dir: str | None = option(None, "folder of the resumable state (a rerun with it continues a killed run)")
    save_every: int = option(50, "with --work-dir, also save inside a block every N steps", parse=parse_positive_int)
    cache_dir: str | None = option(None, "keep the activation streams in files here instead of RAM")
    time_budget: float | None = option(
        None, "wall-clock for the training (e.g. 45m, 1h): steps per block are cut to fit, measured on the first "
        "block's first steps and kept for the run (a resumed run keeps them)", parse=parse_duration)  # fmt: skip
    max_cache_gb: float = field(
        default=4.0, metadata={"help": "streams larger than this go to files (cache_dir, else work_dir or the temp folder)"}
    )

    def __post_init__(self):
        checks = [
            (self.init in ("gptq", "rtn"), f"init {self.init!r}: use gptq or rtn"),
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs {self.epochs}: use 1 or more"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr {self.lr}: the weights' learning rate must be positive"),
            (self.lr_scale >= 0 and math.isfinite(self.lr_scale), f"lr_scale {self.lr_scale}: use 0 or more"),
            (self.batch_size >= 1, f"batch_size {self.batch_size}: use 1 or more"),
            (self.calib_tokens >= 1 and self.seq_len >= 1, "calib_tokens and seq_len must be positive"),
            (self.save_every >= 1, f"save_every {self.save_every}: use 1 or more"),
            (isinstance(self.check_windows, int) and self.check_windows >= 0 and self.check_windows % max(self.batch_size, 1) == 0,
             f"check_windows {self.check_windows}: use 0 or a multiple of batch_size ({self.batch_size})"),
            (self.max_cache_gb > 0, f"max_cache_gb {self.max_cache_gb}: use a positive size"),
            (self.schedule in ("cosine", "constant"), f"schedule {self.schedule!r}: use cosine or constant"),
            (self.loss in ("normed", "mse"), f"loss {self.loss!r}: use normed or mse"),
            (self.sample in ("first", "random"), f"sample {self.sample!r}: use first or random"),
            (self.time_budget is None or self.time_budget > 0, f"time_budget {self.time_budget}: use a positive time"),
        ]
        for ok, message in checks:
            if not ok:
                raise LowbitError(f"Block-AP setting {message}")

    def apply(
        self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True, reference=None
    ) -> dict:
        """Quantize (unless ``model`` already is) and train ``model`` in place, block by block.

        An already quantized ``model`` keeps its own settings (``model.lowbit_config``; ``config`` is
        not used) and needs ``reference``, the full-precision model it was quantized from. Returns the
        report: per-block relative MSE before and after training, seconds, steps; tokens used."""
        from lowbit.eval.models import check_seq_len

        check_seq_len(model, self.seq_len, "--seq-len")
        ids = calibration_windows(tokenizer, self.calib, self.calib_tokens, self.seq_len, self.sample, self.seed)
        if ids.ndim != 2 or len(ids) == 0:
            raise LowbitError(f"{self.calib} gave no window of {self.seq_len} tokens: use a longer text or --seq-len")
        if self.check_windows and len(ids) <= self.check_windows:
            raise LowbitError(f"check_windows {self.check_windows} leaves none of the {len(ids)} calibration windows to "
                              "train on: raise calib_tokens or lower check_windows")  # fmt: skip
        given = getattr(model, "lowbit_config", None) is not None
        if not given:  # the reference and the start point see the same (rotated) weights
            from lowbit.quant.rotation_learn import rotate_for_

            rotate_for_(model, config, calib=ids, progress=progress)
        fp = _reference(model, reference, given)
        if given:
            config = model.lowbit_config
        work = WorkDir(self.work_dir, self._fingerprint(model, fp, config, ids, given)) if self.work_dir else None
        state = work.load() if work else None
        if not given:
            self._start(model, config, ids, work, state, progress)
        start = "given" if given else self.init
        return _Run(self, model, fp, ids, work, state, progress, start).execute()

    def _fingerprint(self, model, fp, config: QuantConfig, ids: torch.Tensor, given: bool) -> dict:
        settings = {f"setting {k}": v for k, v in method_settings(self).items() if k not in _NOT_IN_FINGERPRINT}
        return {
            **settings,
            "quant_config": config.to_dict(),
            "calibration windows": hashlib.sha1(ids.numpy().tobytes()).hexdigest(),
            "full-precision model": model_digest(fp),
            "start point": model_digest(model) if given else f"{self.init} of the full-precision model",
        }

    def _start(self, model, config: QuantConfig, ids, work: WorkDir | None, state, progress: bool) -> None:
        """Quantize ``model`` with the start method, or, resuming, restore the saved start point."""
        from lowbit.ptq.gptq import gptq, rtn

        if state is not None:
            start = work.load_start()
            quantize_model(model, config, initialize=False)
            for name, module in quantized_modules(model):
                module.quantizer.set_scales(start[f"{name}.quantizer.alpha"], start[f"{name}.quantizer.zero"])
            model.load_state_dict(start)
            return
        if self.init == "gptq":
            gptq(model, config, ids, act_order=True, progress=progress)
        else:
            rtn(model, config)
        if work is not None:
            work.save_start(model.state_dict())
            work.save({"done": 0, "blocks": [], "current": None})


def _reference(model: nn.Module, reference, given: bool) -> nn.Module:
    """The full-precision model: ``reference``, or a copy of ``model`` taken before quantizing it."""
    if reference is None:
        if given:
            raise LowbitError(
                "this model is already quantized (it is Block-AP's start point), so Block-AP also needs the "
                "full-precision model it came from: pass apply(..., reference=FP_MODEL)"
            )
        return copy.deepcopy(model)
    if getattr(reference, "lowbit_config", None) is not None:
        raise LowbitError("the reference passed to Block-AP is quantized: pass the full-precision model")
    devices = {p.device for m in (model, reference) for p in m.parameters()}
    if len(devices) > 1:
        raise LowbitError(f"Block-AP needs the model and its reference on one device (found {sorted(map(str, devices))}): "
                          "move both with .to(device) first")  # fmt: skip
    q = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".quantizer." not in k}
    r = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if q != r:
        raise LowbitError("the reference is not the model that was quantized (weights differ in names or shapes)")
    return reference


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _next_norm(fp: nn.Module, fp_layers: nn.ModuleList, i: int):
    """The norm that reads block ``i``'s output first: block ``i + 1``'s input norm, or the final norm.

    Its output is what the rest of the network computes from, one token at a time and free of the
    residual stream's scale: in SmolLM2 the first position's hidden state holds ~98% of the stream's
    energy from the 12th block on (massive activations), so a raw MSE trains for that token alone.
    Falls back to a weightless RMS norm when the model names its norms otherwise."""
    norm = None
    if i + 1 < len(fp_layers):
        norm = getattr(fp_layers[i + 1], "input_layernorm", None)
    else:
        decoder = fp.get_decoder() if hasattr(fp, "get_decoder") else None
        norm = getattr(decoder, "norm", None)
    if isinstance(norm, nn.Module):
        return norm
    return _rms_normalize


def _rms_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Run:
    """One Block-AP run over the decoder blocks of ``model`` (quantized) and ``fp``."""

    def __init__(self, method: BlockAP, model, fp, ids, work, state, progress: bool, start: str):
        self.m, self.model, self.fp, self.ids, self.work, self.progress = method, model, fp, ids, work, progress
        self.q_layers, self.fp_layers = find_decoder_layers(model), find_decoder_layers(fp)
        self.state = state or {"done": 0, "blocks": [], "current": None}
        self.resumed_at = None if state is None else {"block": state["done"], "step": (state["current"] or {}).get("step", 0)}
        self.start = start
        self.kwargs: dict[str, dict[int, dict]] = {"fp": {}, "q": {}}
        self.streams: Streams | None = None
        self.device = next(model.parameters()).device

    def execute(self) -> dict:
        params = [p for m in (self.model, self.fp) for p in m.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        self.model.eval()
        self.fp.eval()
        try:
            with torch.no_grad():
                self._restore_done()
                self._capture()
                for i in range(self.state["done"]):  # a resumed run recomputes the streams
                    self._forward_in_place(self.fp_layers[i], "fp")
                    self._forward_in_place(self.q_layers[i], "q")
            for i in range(self.state["done"], len(self.q_layers)):
                self._block(i)
        finally:
            if self.streams is not None:
                self.streams.close()
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        return self._report()

    # streams -------------------------------------------------------------------------------------
    def _batches(self, start: int = 0) -> list[slice]:
        n, b = len(self.ids), self.m.batch_size
        return [slice(i, min(i + b, n)) for i in range(start, n, b)]

    @property
    def _n_train(self) -> int:
        """The windows trained on: all, or all but the last ``check_windows``."""
        return len(self.ids) - self.m.check_windows

    def _restore_done(self) -> None:
        for i in range(self.state["done"]):
            self.q_layers[i].load_state_dict(self.work.load_block(i))

    def _capture(self) -> None:
        """Block-0 inputs of both models and the attention keyword arguments of every batch size."""
        hidden_size = None
        for rows in self._batches():
            for key, model, layers in (("fp", self.fp, self.fp_layers), ("q", self.model, self.q_layers)):
                hidden, kwargs = capture_block_inputs(model, layers, [self.ids[rows].to(self.device)])[0]
                if self.streams is None:
                    hidden_size = hidden.shape[-1]
                    shape = (len(self.ids), self.ids.shape[1], hidden_size)
                    self.streams = Streams(shape, self.m.cache_dir, self.m.max_cache_gb, self.m.work_dir, self.device)
                getattr(self.streams, key)[rows] = hidden.float()
                self.kwargs[key].setdefault(rows.stop - rows.start, kwargs)

    def _forward_in_place(self, block: nn.Module, key: str) -> None:
        stream = getattr(self.streams, key)
        for rows in self._batches():
            stream[rows] = block_output(block, stream[rows], self.kwargs[key][rows.stop - rows.start])

    @torch.no_grad()
    def _relative_mse(self, i: int) -> float:
        """sum (v(q_block(x_q)) - v(y))^2 / sum v(y)^2 over the check windows (every window without them) for
        block ``i``, v the objective's view of a block output (:meth:`_view`)."""
        err = energy = 0.0
        block, view = self.q_layers[i], self._view(i)
        for rows in self._batches(self._n_train if self.m.check_windows else 0):
            y = view(self.streams.fp[rows])
            out = view(block_output(block, self.streams.q[rows], self.kwargs["q"][rows.stop - rows.start]))
            err += (out - y).double().pow(2).sum().item()
            energy += y.double().pow(2).sum().item()
        return err / max(energy, 1e-30)

    def _view(self, i: int):
        """How the objective sees block ``i``'s output: as it is (``loss="mse"``) or through the
        full-precision model's next norm (``"normed"``)."""
        return _identity if self.m.loss == "mse" else _next_norm(self.fp, self.fp_layers, i)

    # one block -----------------------------------------------------------------------------------
    def _order(self, block: int, epoch: int) -> list[torch.Tensor]:
        """The mini-batches (window indices) of one epoch: a pure function of (seed, block, epoch)."""
        seed = int(np.random.SeedSequence([self.m.seed, block, epoch]).generate_state(1)[0])
        perm = torch.randperm(self._n_train, generator=torch.Generator().manual_seed(seed))
        return list(torch.split(perm, self.m.batch_size))

    def _block(self, i: int) -> None:
        t0 = time.time()
        q_block = self.q_layers[i]
        with torch.no_grad():
            self._forward_in_place(self.fp_layers[i], "fp")  # the fp stream becomes block i's targets
        self._pass_seconds = time.time() - t0  # one forward pass of the block over every window
        current = self.state.get("current")
        if current is not None and current["block"] == i:
            initial, init_state, step, spent = current["mse_initial"], current["initial_state"], current["step"], current["seconds"]
        else:
            t_check = time.time()
            initial, init_state, step, spent = self._relative_mse(i), clone_state(q_block), 0, 0.0
            self._check_seconds = time.time() - t_check  # the error measured once (before; again after)
        trainer = _BlockTrainer(q_block, self.m, self._view(i))
        if current is not None and current["block"] == i:
            trainer.load(current["trainer"])
        per_epoch = math.ceil(self._n_train / self.m.batch_size)
        total = self.state.get("steps_per_block") or self.m.epochs * per_epoch
        probing = self.m.time_budget is not None and "steps_per_block" not in self.state
        bar = tqdm(total=total, initial=step, desc=f"Block-AP {i + 1}/{len(self.q_layers)}", unit="step",
                   disable=not self.progress, leave=False)
        try:
            while step < total:
                epoch, k = divmod(step, per_epoch)
                idx = self._order(i, epoch)[k]
                kwargs = self.kwargs["q"][len(idx)]
                loss = trainer.step(self.streams.q[idx], self.streams.fp[idx], kwargs, step, total)
                step += 1
                if probing and step == 1:
                    t_steps = time.time()
                if probing and step == min(PROBE_STEPS, total):
                    total = self._fit_time_budget(total, (time.time() - t_steps) / max(step - 1, 1))
                    probing = False
                    bar.total = total
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3g}")
                if self.work is not None and step % self.m.save_every == 0 and step < total:
                    self._save_current(i, step, initial, init_state, trainer, spent + time.time() - t0)
        finally:
            bar.close()
            trainer.finish()
        self._finish_block(i, initial, init_state, total, spent, t0)

    def _fit_time_budget(self, total: int, step_seconds: float) -> int:
        """Steps per block that fit ``time_budget`` over all blocks, from the measured seconds per step, per
        forward pass over the windows (two a block: targets, the quantized stream) and per error measure
        (two: before and after; on ``check_windows`` alone when set)."""
        blocks = len(self.q_layers)
        per_block = self.m.time_budget / blocks
        step_seconds = max(step_seconds, 1e-6)
        overhead = 2.0 * getattr(self, "_pass_seconds", 0.0) + 2.0 * getattr(self, "_check_seconds", 0.0)
        fitted = max(PROBE_STEPS, min(total, int((per_block - overhead) / step_seconds)))
        self.state["steps_per_block"] = fitted
        self.state["step_seconds_measured"] = round(step_seconds, 4)
        self.state["pass_seconds_measured"] = round(getattr(self, "_pass_seconds", 0.0), 4)
        if self.progress:
            tqdm.write(f"Block-AP: {step_seconds:.2f} s per step, {overhead:.1f} s of passes per block: {fitted} "
                       f"steps per block to fit {self.m.time_budget / 60:.1f} min over {blocks} blocks (asked: {total})")  # fmt: skip
        return fitted

    def _save_current(self, i, step, initial, init_state, trainer, seconds) -> None:
        current = {"block": i, "step": step, "mse_initial": initial, "initial_state": init_state,
                   "trainer": trainer.state(), "seconds": seconds}
        self.work.save({**self.state, "current": current})

    def _finish_block(self, i: int, initial: float, init_state: dict, steps: int, spent: float, t0: float) -> None:
        """Measure the snapped block, put its start back if training made it worse, advance the q stream."""
        q_block = self.q_layers[i]
        final = self._relative_mse(i)
        reverted = final > initial
        if reverted:
            q_block.load_state_dict(init_state)
            _snap_block_(q_block)
            final = self._relative_mse(i)
        with torch.no_grad():
            self._forward_in_place(q_block, "q")
        seconds = spent + time.time() - t0
        record = {"block": i, "mse_initial": initial, "mse_final": final, "steps": steps,
                  "seconds": round(seconds, 2), "reverted": reverted}
        self.state = {**self.state, "done": i + 1, "blocks": [*self.state["blocks"], record], "current": None}
        if self.work is not None:
            self.work.save_block(i, clone_state(q_block))
            self.work.save(self.state)
        if self.progress:
            tqdm.write(
                f"Block-AP block {i + 1}/{len(self.q_layers)}: relative MSE {initial:.4g} -> {final:.4g}"
                f"{' (worse: start kept)' if reverted else ''}, {steps} steps, {seconds:.0f} s"
            )

    def _report(self) -> dict:
        n, seq = self.ids.shape
        return {
            "blocks": self.state["blocks"],
            "start": self.start,
            "windows": int(n),
            "seq_len": int(seq),
            "tokens": int(n * seq),
            "train_tokens_per_block": int((self.state.get("steps_per_block") or 0) * self.m.batch_size * seq)
            or int(n * seq * self.m.epochs),
            "streams": "RAM" if self.streams is None or self.streams.folder is None else "disk",
            "resumed_at": self.resumed_at,
            "steps_per_block": self.state.get("steps_per_block"),
            "step_seconds_measured": self.state.get("step_seconds_measured"),
            "train_tokens_total": int(sum(b["steps"] for b in self.state["blocks"]) * self.m.batch_size * seq),
        }


class _BlockTrainer:
    """The trainable tensors of one quantized block (latent weights; step sizes and, for min-max grids,
    latent zero points rounded straight-through) and their AdamW optimizer."""

    def __init__(self, block: nn.Module, method: BlockAP, view=None):
        self.block, self.m, self.view = block, method, view or _identity
        self.linears = [m for m in block.modules() if isinstance(m, QuantizedLinear)]
        groups, self.zeros, self.hooks = [], [], []
        for module in self.linears:
            quantizer = module.quantizer
            alpha = quantizer.alpha.detach()
            step = float((alpha * quantizer.step_per_alpha).abs().mean())
            groups.append({"params": [module.weight.requires_grad_(True)], "lr": method.lr * step})
            if method.lr_scale == 0:
                continue
            groups.append({"params": [quantizer.alpha.requires_grad_(True)], "lr": method.lr_scale * float(alpha.abs().mean())})
            if not quantizer.symmetric_zero:
                latent = nn.Parameter(quantizer.zero.detach().clone())
                self.zeros.append((quantizer, latent))
                groups.append({"params": [latent], "lr": method.lr_scale})  # zero points are in code units
                self.hooks.append(quantizer.register_forward_pre_hook(_zero_hook(latent)))
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=method.lr, weight_decay=0.0)

    def step(self, x: torch.Tensor, y: torch.Tensor, kwargs: dict, step: int, total: int) -> float:
        factor = 1.0
        if self.m.schedule == "cosine":
            low = 1.0 / MIN_LR_FACTOR
            factor = low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * step / total))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        loss = F.mse_loss(self.view(block_output(self.block, x, kwargs)), self.view(y))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for module in self.linears:
                module.quantizer.alpha.clamp_(min=1e-8)
        return loss.item()

    def state(self) -> dict:
        return {"block": clone_state(self.block), "zeros": [z.detach().clone() for _, z in self.zeros],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "base_lrs": list(self.base_lrs)}

    def load(self, state: dict) -> None:
        with torch.no_grad():
            self.block.load_state_dict(state["block"])
            for (_, latent), saved in zip(self.zeros, state["zeros"], strict=True):
                latent.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.base_lrs = list(state["base_lrs"])

    @torch.no_grad()
    def finish(self) -> None:
        """Zero points back to integers, then the block snapped as lowbit stores it; nothing trainable."""
        for hook in self.hooks:
            hook.remove()
        for quantizer, latent in self.zeros:
            quantizer.zero = latent.detach().round().clamp(0, quantizer.n_levels - 1)
        for module in self.linears:
            module.weight.requires_grad_(False)
            module.quantizer.alpha.requires_grad_(False)
        _snap_block_(self.block)


def _zero_hook(latent: nn.Parameter):
    def hook(quantizer, _args):
        quantizer.zero = torch.clamp(round_ste(latent), 0, quantizer.n_levels - 1)

    return hook


@torch.no_grad()
def _snap_block_(block: nn.Module) -> None:
    """Steps made fp16-exact, then weights replaced by their quantized values (as stored)."""
    for module in block.modules():
        if isinstance(module, QuantizedLinear):
            module.quantizer.round_scales_(torch.float16)
            module.weight.copy_(module.quantizer(module.weight))
