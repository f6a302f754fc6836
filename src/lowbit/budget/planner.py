"""A byte budget as the knob: the ``budget`` method plans each layer's bits, group and grid, then quantizes.

``Budget(budget_bpw=4.5)`` measures every decoder linear's predicted loss increase at each candidate
setting (:mod:`lowbit.budget.sensitivity`), chooses one setting per layer so that the linears as stored take at
most ``budget_bpw`` bits per weight with the least total predicted increase (:mod:`lowbit.budget.allocation`),
and quantizes with ``then_method`` (GPTQ by default) under a :class:`~lowbit.quant.surgery.QuantConfig` whose
``overrides`` name each layer's setting (so the folder's ``lowbit.json`` records the plan as its
``quant_config``). ``budget_mb`` bounds every byte of the weights file instead (or as well): the
embedding and output head then join the plan, kept in high precision unless the budget forces them to
8, 6 or 4 bits (:data:`EMBEDDING_CANDIDATES`); the printed plan and the report (``plan_embeddings``, kept in
``lowbit.json``) say which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from lowbit.budget.plan import (
    BUDGET_BPW_HELP,
    BUDGET_MB_HELP,
    DEFAULT_CANDIDATES,
    Plan,
    achieved,
    plan_from_tables,
    sensitivity_tables,
)
from lowbit.budget.sensitivity import Setting
from lowbit.budget.streamed import stream_plan
from lowbit.errors import LowbitError
from lowbit.options import option, parse_positive_int
from lowbit.ptq.methods import calibration_windows, make_method, method_class, method_settings, register_method
from lowbit.quant.surgery import QuantConfig


@register_method
@dataclass(frozen=True)
class Budget:
    """Plan per-layer settings for a byte budget from Fisher-weighted rounding errors, then quantize."""

    name: ClassVar[str] = "budget"
    kind: ClassVar[str] = "post-training"
    plans_bits: ClassVar[bool] = True  # the config's bits/group/grid are replaced by the plan
    streamable: ClassVar[bool] = True  # a bits-per-weight budget plans block by block (lowbit.budget.streamed)

    budget_bpw: float | None = option(None, BUDGET_BPW_HELP)
    budget_mb: float | None = option(None, BUDGET_MB_HELP)
    candidates: tuple[str, ...] = field(
        default=DEFAULT_CANDIDATES,
        metadata={
            "help": "settings BITS:GROUP:GRID to choose from, e.g. 4:64:minmax 3:channel:auto "
            "(default: 2/3/4 bits x channel/128/64/32 x auto/minmax, 8 bits x channel/128)",
            "nargs": "+",
            "show_default": False,
        },
    )
    then_method: str = field(default="gptq", metadata={"help": "post-training method run on the plan: gptq or rtn"})
    calib: str = field(default="wiki-calib", metadata={"help": "calibration text: wiki-calib, news or a text file"})
    calib_tokens: int = field(default=16384, metadata={"help": "calibration tokens", "parse": parse_positive_int})
    seq_len: int = field(default=512, metadata={"help": "calibration window length", "parse": parse_positive_int})
    fisher_tokens: int = field(
        default=8192, metadata={"help": "calibration tokens for the Fisher sensitivities", "parse": parse_positive_int}
    )

    def __post_init__(self):
        if self.budget_bpw is None and self.budget_mb is None:
            raise LowbitError("the budget method needs --budget-bpw or --budget-mb")
        if self.budget_bpw is not None and not 0 < self.budget_bpw < 16:
            raise LowbitError(
                f"budget of {self.budget_bpw:g} bits per weight: "
                + ("use full precision (16 bits) instead" if self.budget_bpw >= 16 else "it must be positive")
            )
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise LowbitError(f"budget of {self.budget_mb:g} MB: it must be positive")
        then = method_class(self.then_method)
        if then.name == self.name or then.kind != "post-training" or getattr(then, "plans_bits", False) or not hasattr(
                then, "quantize"):  # a method that quantizes as the plan says (its quantize: no second rotation)
            raise LowbitError(f"then_method {self.then_method!r} must be a post-training method such as gptq or rtn")
        object.__setattr__(self, "candidates", tuple(str(Setting.parse(c)) for c in self.candidates))

    def apply(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict:
        from lowbit.quant.rotation_learn import rotate_for_

        rotate_for_(model, config, calib=lambda: calibration_windows(tokenizer, self.calib, self.calib_tokens,
                    self.seq_len), progress=progress)  # fmt: skip
        return self.quantize(model, config, tokenizer, progress)

    def quantize(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict:
        """:meth:`apply` on a model already rotated as ``config`` asks: plan, then ``then_method`` on the plan."""
        tables, emb_table = sensitivity_tables(self, model, config, tokenizer, progress)
        return self.quantize_from_tables(model, config, tables, emb_table, tokenizer, progress)

    def quantize_from_tables(self, model: nn.Module, config: QuantConfig, tables, emb_table, tokenizer=None,
                             progress: bool = True) -> dict:  # fmt: skip
        """:meth:`quantize` with the sensitivity tables of this model, config and calibration already measured
        (:func:`lowbit.budget.plan.sensitivity_tables`): budgets over one model share them, as a sweep's
        byte-budget points do (:meth:`lowbit.budget.auto.Auto.sweep_apply`)."""
        plan = plan_from_tables(self, model, config, tables, emb_table)
        if progress:
            print(plan.table())
        then, planned = self.planned_run(plan, config)
        report = then.quantize(model, planned, tokenizer=tokenizer, progress=progress)
        return {**plan.record(), **achieved(model, plan), "then": report}

    def planned_run(self, plan: Plan, config: QuantConfig):
        """The method (``then_method`` with this method's settings) and config that carry out ``plan``."""
        return make_method(self.then_method, **method_settings(self)), plan.quant_config(config)

    def check_streamable(self) -> None:
        if self.budget_mb is not None:
            raise LowbitError(
                "--stream plans --budget-bpw, not --budget-mb (a file budget also plans the embedding, which "
                "needs the whole model): use --budget-bpw, or drop --stream"
            )

    def stream_plan(self, model, ckpt, config: QuantConfig, tokenizer, work, limit: int, progress: bool) -> Plan:
        """The plan :meth:`apply` makes, from sensitivities computed one block at a time on a checkpoint."""
        return stream_plan(model, ckpt, config, self, tokenizer, work, limit, progress)
