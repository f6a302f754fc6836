"""QAT as a method of :mod:`lowbit.ptq.methods` (kind "training"), for the Pareto sweep and
``make_method("qat", steps=...)``: the in-memory :func:`~lowbit.train.loop.train` behind ``apply``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from lowbit.options import parse_positive_int
from lowbit.quant.surgery import QuantConfig


@dataclass(frozen=True)
class QAT:
    """Quantization-aware training (ParetoQ, Liu et al. 2025) distilled from a frozen copy of the
    full-precision model (LLM-QAT, Liu et al. 2023), ``steps`` optimizer steps on ``data`` in
    windows of ``seq_len``; ``settings`` are further :class:`~lowbit.train.config.TrainConfig`
    fields (batch_size, lr, scale_lr, loss, ...)."""

    name: ClassVar[str] = "qat"
    kind: ClassVar[str] = "training"

    steps: int = field(metadata={"help": "QAT optimizer steps", "parse": parse_positive_int})
    data: str = field(default="wiki-train", metadata={"help": "QAT training text: wiki-train, news or a file"})
    seq_len: int = field(default=512, metadata={"help": "QAT training window length", "parse": parse_positive_int})
    seed: int = field(default=0, metadata={"help": "seed of the QAT data order"})
    settings: dict = field(default_factory=dict, metadata={"cli": False})

    def apply(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict:
        """Quantize ``model`` in place with ``config`` and train it; the loss record of ``train``
        (steps, train_tokens, train_seconds, tokens_per_s, first_loss, final_loss, data, metrics)."""
        from lowbit.train.loop import train

        return train(
            model,
            config,
            tokenizer=tokenizer,
            data=self.data,
            steps=self.steps,
            seq_len=self.seq_len,
            seed=self.seed,
            progress=progress,
            **self.settings,
        )

    @classmethod
    def sweep_settings(cls, spec, fingerprints: dict[str, str]) -> list[tuple[dict, dict]]:
        """A Pareto sweep's QAT points (:mod:`lowbit.pareto`), one per bit-width and granularity, only with
        a step budget (``spec.qat_steps > 0``), trained on ``spec.qat_data`` (its content hash from
        ``fingerprints`` in the key): (settings for ``make_method``, settings added to the point's key)."""
        if spec.qat_steps <= 0:
            return []
        made = {"steps": spec.qat_steps, "data": spec.qat_data, "seq_len": spec.seq_len, "seed": spec.seed,
                "settings": {"warmup": min(4, spec.qat_steps - 1), **spec.qat_settings}}  # fmt: skip
        keyed = {
            "qat_data": spec.qat_data,
            "qat_data_sha256": fingerprints[spec.qat_data],
            "qat_steps": spec.qat_steps,
            "qat_settings": spec.qat_settings,
        }
        return [(made, {**point, **keyed}) for point in spec.uniform_points()]
