"""``--method auto``: the best pipeline lowbit knows for a byte budget and the time allowed.

Stages, in order, each only when it applies (docs/methods.md, "Auto"):

1. **rotation** (QuaRot-style, :mod:`lowbit.quant.rotation`) when the architecture allows it (Llama-style
   RMSNorm decoders; not Gemma's sandwich norms): it spreads outlier input channels over all channels,
   so every grid fits the weights better (docs/results-quality.md, "Rotation");
2. **byte-budget plan + GPTQ** (:class:`lowbit.budget.planner.Budget`): minutes;
3. **Block-AP** (:class:`lowbit.train.blockap.BlockAP`) with 60% of what is left of ``time_budget``: each
   decoder block trained to reproduce the full-precision block, steps per block cut to fit;
4. **end to end** (:func:`lowbit.train.train`) in the rest: KL distillation from the full-precision model on
   all weights and step sizes (ParetoQ's rates), not the step sizes alone as EfficientQAT's E2E-QP trains
   them: all weights reach a lower KL in less time, and move ternary models that step sizes alone do not
   (docs/qat.md, "Below 3.5 bits").

Without ``time_budget`` the pipeline stops after stage 2 (post-training only). The report records each
stage's seconds and tokens, and what was skipped and why.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from lowbit.budget.plan import BUDGET_BPW_HELP, BUDGET_MB_HELP
from lowbit.errors import LowbitError
from lowbit.options import option, parse_duration, parse_positive_int
from lowbit.ptq.methods import register_method
from lowbit.quant.surgery import QuantConfig

MIN_BLOCKAP_SECONDS = 120.0  # below this, Block-AP's measured step and stream passes leave too few steps to help
MIN_E2E_SECONDS = 60.0
E2E_SHARE = 0.4  # of the time left after the plan and GPTQ: end to end (Block-AP gets the rest)
E2E_BATCH, E2E_SEQ_LEN = 8, 256  # 2,048 tokens a step; rates: ParetoQ's for the model's default bits


@register_method
@dataclass(frozen=True)
class Auto:
    """Rotation where it applies, the byte-budget plan with GPTQ, then Block-AP and end-to-end step sizes in the time left."""

    name: ClassVar[str] = "auto"
    kind: ClassVar[str] = "post-training"
    stream_instead: ClassVar[str] = "--method budget (plan and GPTQ, without rotation or training)"
    plans_bits: ClassVar[bool] = True

    budget_bpw: float | None = option(None, BUDGET_BPW_HELP)
    budget_mb: float | None = option(None, BUDGET_MB_HELP)
    time_budget: float | None = option(
        None, "wall-clock allowed (e.g. 30m, 1h): what is left after the plan and GPTQ goes to Block-AP; "
        "without it auto stops after GPTQ", parse=parse_duration)  # fmt: skip
    rotation: str = field(
        default="auto",
        metadata={"help": "rotate first: auto (where the architecture allows), yes, no", "choices": ("auto", "yes", "no")},
    )
    calib: str = field(default="wiki-train", metadata={"help": "calibration text: wiki-train, news or a text file"})
    calib_tokens: int = field(default=16384, metadata={"help": "calibration tokens", "parse": parse_positive_int})
    e2e_steps: int | None = field(
        default=None, metadata={"help": "at most this many end-to-end steps (default: as many as the time allows)",
                                "parse": parse_positive_int},
    )
    blockap_tokens: int = field(
        default=65536, metadata={"help": "Block-AP calibration tokens (random windows)", "parse": parse_positive_int}
    )
    seq_len: int = field(default=512, metadata={"help": "calibration window length", "parse": parse_positive_int})

    def __post_init__(self):
        from lowbit.budget.planner import Budget

        Budget(budget_bpw=self.budget_bpw, budget_mb=self.budget_mb)  # the same checks, the same messages
        if self.rotation not in ("auto", "yes", "no"):
            raise LowbitError(f"rotation {self.rotation!r}: use auto, yes or no")
        if self.time_budget is not None and not self.time_budget > 0:
            raise LowbitError(f"time budget {self.time_budget}: give a positive duration such as 30m or 1h")

    def apply(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict:
        from lowbit.budget.planner import Budget

        t0 = time.time()
        stages: list[dict] = []
        skipped: dict[str, str] = {}
        config = self._rotate(model, config, stages, skipped, tokenizer, progress)
        fp = copy.deepcopy(model) if self.time_budget is not None else None
        start = time.time()
        budget = Budget(budget_bpw=self.budget_bpw, budget_mb=self.budget_mb, calib=self.calib,
                        calib_tokens=self.calib_tokens, seq_len=self.seq_len)  # fmt: skip
        plan = budget.quantize(model, config, tokenizer=tokenizer, progress=progress)  # rotated above, once
        stages.append({"stage": "budget+gptq", "seconds": round(time.time() - start, 1),
                       "tokens": budget.calib_tokens + budget.fisher_tokens})  # fmt: skip
        if self.time_budget is None:
            skipped["blockap"] = skipped["e2e"] = "no --time-budget given"
        else:
            left = self.time_budget - (time.time() - t0)
            if left < MIN_BLOCKAP_SECONDS:
                skipped["blockap"] = f"{max(left, 0):.0f} s left of the time budget (needs {MIN_BLOCKAP_SECONDS:.0f})"
            else:
                stages.append(self._blockap(model, fp, tokenizer, (1.0 - E2E_SHARE) * left, progress))
            left = self.time_budget - (time.time() - t0)
            if left < MIN_E2E_SECONDS:
                skipped["e2e"] = f"{max(left, 0):.0f} s left of the time budget (needs {MIN_E2E_SECONDS:.0f})"
            else:
                stages.append(self._e2e(model, fp, tokenizer, left, progress))
        return {"stages": stages, "skipped": skipped, "plan": plan, "seconds": round(time.time() - t0, 1)}

    def _e2e(self, model: nn.Module, fp: nn.Module, tokenizer, left: float, progress: bool) -> dict:
        """The end-to-end phase: KL distillation from ``fp`` on all weights and step sizes, as many steps as
        fit in ``left`` seconds (timed on two probe steps, which also train)."""
        from lowbit.train import train
        from lowbit.train.config import default_lr

        start = time.time()
        config = dataclasses.replace(model.lowbit_config, rotate=False, rotation_steps=0)  # rotated already
        settings = dict(data=self.calib, seq_len=min(E2E_SEQ_LEN, self.seq_len), teacher=fp, train_params="all",
                        lr=default_lr(config.bits), batch_size=E2E_BATCH)  # fmt: skip
        probe = train(model, config, tokenizer, steps=2, warmup=0, progress=False, **settings)
        step_seconds = (time.time() - start) / 2
        steps = int((left - (time.time() - start)) / step_seconds)
        if self.e2e_steps is not None:
            steps = min(steps, self.e2e_steps - 2)
        records = [probe]
        if steps >= 2:
            records.append(train(model, config, tokenizer, steps=steps, warmup=min(10, steps // 10),
                                 progress=progress, **settings))  # fmt: skip
        return {"stage": "e2e", "seconds": round(time.time() - start, 1),
                "tokens": sum(r["train_tokens"] for r in records), "steps": sum(r["steps"] for r in records),
                "first_loss": probe["first_loss"], "final_loss": records[-1]["final_loss"]}  # fmt: skip

    def _rotate(self, model: nn.Module, config: QuantConfig, stages: list, skipped: dict, tokenizer=None,
                progress: bool = False) -> QuantConfig:
        from lowbit.ptq.methods import calibration_windows
        from lowbit.quant.rotation import rotation_unsupported
        from lowbit.quant.rotation_learn import rotate_for_

        if self.rotation == "no" and not config.rotate:
            skipped["rotation"] = "rotation no"
            return config
        reason = rotation_unsupported(model)
        if reason and self.rotation == "auto" and not config.rotate:
            skipped["rotation"] = reason
            return config
        start = time.time()
        config = dataclasses.replace(config, rotate=True)

        def windows():  # read only when --rotation-steps learns the rotation
            return calibration_windows(tokenizer, self.calib, self.calib_tokens, self.seq_len)

        # raises the one-line reason when rotation was asked for and cannot be done
        record = rotate_for_(model, config, calib=windows, progress=progress)
        tokens = record.get("steps", 0) * record.get("windows_per_step", 0) * record.get("seq_len", 0)
        stages.append({"stage": "rotation", "seconds": round(time.time() - start, 1), "tokens": tokens})
        return config

    def _blockap(self, model: nn.Module, fp: nn.Module, tokenizer, left: float, progress: bool) -> dict:
        from lowbit.train.blockap import BlockAP

        start = time.time()
        # Block-AP's own capture and the final passes take time outside its step budget: keep 10% back
        method = BlockAP(calib=self.calib, calib_tokens=self.blockap_tokens, seq_len=self.seq_len,
                         time_budget=0.9 * left)  # fmt: skip
        report = method.apply(model, model.lowbit_config, tokenizer, progress=progress, reference=fp)
        return {"stage": "blockap", "seconds": round(time.time() - start, 1), "tokens": report["train_tokens_total"],
                "steps_per_block": report["steps_per_block"],
                "blocks": [{k: b[k] for k in ("block", "mse_initial", "mse_final")} for b in report["blocks"]]}  # fmt: skip

    @classmethod
    def sweep_settings(cls, spec, fingerprints: dict[str, str]) -> list[tuple[dict, dict]]:
        """A Pareto sweep's byte-budget points (:mod:`lowbit.pareto`), one per ``spec.budget_bpw``, run as
        ``lowbit quantize --budget-bpw X`` runs without ``--time-budget``: rotation where the architecture
        allows, the plan, GPTQ (no Block-AP or end to end), calibrated on the sweep's ``calib`` text like
        its GPTQ points. Returns (settings for ``make_method``, settings added to the point's key): the
        budget, the text and its content hash, and the defaults of this pipeline that change the numbers."""
        from lowbit.budget.planner import Budget

        made = {"calib": spec.calib, "calib_tokens": spec.calib_tokens, "seq_len": spec.seq_len}
        planner = {f.name: f.default for f in dataclasses.fields(Budget) if f.name in ("candidates", "fisher_tokens",
                   "then_method")}  # fmt: skip
        keyed = {
            "calib": spec.calib,
            "calib_sha256": fingerprints[spec.calib],
            "calib_tokens": spec.calib_tokens,
            "rotation": cls.rotation,
            "time_budget": None,
            "scale_search": spec.scale_search,
            "hp_dtype": spec.hp_dtype,
            **planner,
        }
        return [({**made, "budget_bpw": b}, {"budget_bpw": b, **keyed}) for b in spec.budget_bpw]

    @classmethod
    def sweep_apply(cls, methods: list[Auto], model: nn.Module, config: QuantConfig, tokenizer=None,
                    progress: bool = True):  # fmt: skip
        """What ``m.apply(copy.deepcopy(model), config, tokenizer, progress)`` returns for each ``m`` of ``methods``,
        as (quantized copy, report) pairs yielded one at a time (``model`` stays as it is). Budgets in bits per
        weight that differ in nothing else share what does not depend on the budget: the rotation and the
        sensitivities (the Fisher pass and every layer's table) are computed once, so a sweep's byte-budget points
        cost one plan and one GPTQ each. Any other list runs one by one through :meth:`apply`."""
        from lowbit.budget.plan import sensitivity_tables
        from lowbit.budget.planner import Budget

        first = methods[0]
        if any(m.budget_mb is not None or m.time_budget is not None
               or dataclasses.replace(m, budget_bpw=first.budget_bpw) != first for m in methods):  # fmt: skip
            for m in methods:
                quantized = copy.deepcopy(model)
                yield quantized, m.apply(quantized, config, tokenizer=tokenizer, progress=progress)
            return
        t0 = time.time()
        stages: list[dict] = []
        skipped: dict[str, str] = {}
        base = copy.deepcopy(model)
        config = first._rotate(base, config, stages, skipped, tokenizer, progress)
        budgets = [Budget(budget_bpw=m.budget_bpw, calib=m.calib, calib_tokens=m.calib_tokens, seq_len=m.seq_len)
                   for m in methods]  # fmt: skip
        start = time.time()
        tables, emb_table = sensitivity_tables(budgets[0], base, config, tokenizer, progress)
        stages.append({"stage": "sensitivities", "seconds": round(time.time() - start, 1),
                       "tokens": budgets[0].fisher_tokens, "shared_by": len(methods)})  # fmt: skip
        skipped["blockap"] = skipped["e2e"] = "no --time-budget given"
        shared = time.time() - t0
        for budget in budgets:
            start = time.time()
            quantized = copy.deepcopy(base)
            plan = budget.quantize_from_tables(quantized, config, tables, emb_table, tokenizer, progress)
            own = {"stage": "plan+gptq", "seconds": round(time.time() - start, 1), "tokens": budget.calib_tokens}
            yield quantized, {"stages": [*stages, own], "skipped": dict(skipped), "plan": plan,
                              "seconds": round(shared + time.time() - start, 1)}  # fmt: skip
