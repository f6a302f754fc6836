"""A byte-budget plan: the sensitivity tables, the knapsack's choice per layer and what it costs in bytes.

Made by :func:`make_plan` (in memory) or :func:`lowbit.budget.streamed.stream_plan` (block by block);
carried out by :class:`lowbit.budget.planner.Budget`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.budget.allocation import Knapsack, min_bytes
from lowbit.budget.sensitivity import LayerTable, Setting, fisher_diagonal, layer_table
from lowbit.errors import LowbitError
from lowbit.ptq.methods import calibration_windows
from lowbit.quant.surgery import HP_DTYPES, QuantConfig, is_linear, linear_weight, output_head_names
from lowbit.store.folder import build_state

# Settings lowbit stores with an exactly known byte cost: symmetric (ParetoQ "auto") and asymmetric
# (min-max) grids at 2, 3 and 4 bits, per channel or in groups of 128, 64, 32; 8 bits per channel or g128.
DEFAULT_CANDIDATES = tuple(
    f"{bits}:{group}:{grid}" for bits in (2, 3, 4) for group in ("channel", 128, 64, 32) for grid in ("auto", "minmax")
) + ("8:channel:auto", "8:channel:minmax", "8:128:auto", "8:128:minmax")
# The embedding (and head) when a file budget forces them below high precision: 8 bits per channel,
# 6 bits (packed u6, 4 codes in 3 bytes) per channel or in groups of 128 or 64, 4 bits in groups of 128, 64, 32.
EMBEDDING_CANDIDATES = (
    ("8:channel:auto", "8:channel:minmax")
    + tuple(f"6:{group}:{grid}" for group in ("channel", 128, 64) for grid in ("auto", "minmax"))
    + tuple(f"4:{group}:{grid}" for group in (128, 64, 32) for grid in ("auto", "minmax"))
)
BUDGET_BPW_HELP = "bits per weight over the decoder linears as stored (codes, steps, zeros)"
BUDGET_MB_HELP = "megabytes (10^6 bytes) of the whole weights file, embedding and head included"
HEADER_BYTES_PER_TENSOR = 128  # safetensors header entry beyond the name: dtype, shape, offsets (upper bound)


@dataclass
class Plan:
    """Each decoder linear's table and chosen candidate, the budget in bytes and the Lagrangian lower
    bound on the predicted loss. With a file budget also the embedding's table (``embedding_choice``
    None: kept in high precision, ``hp_embedding_bytes``), ``fixed_bytes``, the rest of the tensors
    (high precision), and ``header_bytes``, a bound on the safetensors header."""

    tables: list[LayerTable]
    choice: list[int]
    budget_bytes: int
    lower_bound: float
    embedding: LayerTable | None = None
    embedding_choice: int | None = None
    hp_embedding_bytes: int = 0
    fixed_bytes: int | None = None
    header_bytes: int = 0

    def setting(self, i: int) -> Setting:
        return self.tables[i].settings[self.choice[i]]

    @property
    def linear_bytes(self) -> int:
        return sum(t.nbytes[c] for t, c in zip(self.tables, self.choice, strict=True))

    @property
    def linear_params(self) -> int:
        return sum(t.params for t in self.tables)

    @property
    def predicted_loss(self) -> float:
        loss = sum(t.loss[c] for t, c in zip(self.tables, self.choice, strict=True))
        return loss + (self.embedding.loss[self.embedding_choice] if self.embedding_choice is not None else 0.0)

    def quant_config(self, config: QuantConfig) -> QuantConfig:
        """``config`` with one override per planned layer (exact names), and the embedding's if quantized."""
        overrides = {t.name: self.setting(i).spec() for i, t in enumerate(self.tables)}
        quantize_embeddings = self.embedding_choice is not None
        if quantize_embeddings:
            overrides["embeddings"] = self.embedding.settings[self.embedding_choice].spec()
        return dataclasses.replace(config, overrides=overrides, quantize_embeddings=quantize_embeddings)

    def summary(self) -> dict[str, int]:
        """How many layers take each setting."""
        counts: dict[str, int] = {}
        for i in range(len(self.tables)):
            counts[str(self.setting(i))] = counts.get(str(self.setting(i)), 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def record(self) -> dict:
        """The plan as plain JSON: per layer its setting, bytes and predicted loss increase."""
        layers = {
            t.name: {
                "setting": str(self.setting(i)),
                "bytes": t.nbytes[self.choice[i]],
                "predicted": t.loss[self.choice[i]],
            }
            for i, t in enumerate(self.tables)
        }
        emb = None
        if self.embedding_choice is not None:
            e, c = self.embedding, self.embedding_choice
            emb = {"setting": str(e.settings[c]), "bytes": e.nbytes[c], "predicted": e.loss[c]}
        total = None if self.fixed_bytes is None else self.fixed_bytes + self.linear_bytes + self.embedding_bytes
        return {
            "plan": layers,
            "plan_embeddings": emb,
            "plan_summary": self.summary(),
            "budget_bytes": self.budget_bytes,
            "predicted_bits_per_weight_linear": 8.0 * self.linear_bytes / self.linear_params,
            "predicted_linear_bytes": self.linear_bytes,
            "predicted_tensor_bytes": total,
            "predicted_file_bytes_at_most": None if total is None else total + self.header_bytes,
            "predicted_loss_increase": self.predicted_loss,
            "predicted_loss_lower_bound": self.lower_bound,
        }

    @property
    def embedding_bytes(self) -> int:
        """Bytes of the embedding and head as planned (quantized or high precision); 0 when not planned."""
        if self.fixed_bytes is None:
            return 0
        return (
            self.embedding.nbytes[self.embedding_choice]
            if self.embedding_choice is not None
            else self.hp_embedding_bytes
        )

    def table(self) -> str:
        """The plan as one row per decoder block, one column per kind of linear; cells ``BITS[/GROUP][a]``."""
        return format_plan(self)


def _label(s: Setting) -> str:
    group = "" if s.group_size is None else f"/{s.group_size}"
    return f"{s.bits:g}{group}{'a' if s.quantizer == 'minmax' else ''}"


def format_plan(plan: Plan) -> str:
    rows: dict[str, dict[str, str]] = {}
    for i, t in enumerate(plan.tables):
        m = re.search(r"\.(\d+)\.(.+)$", t.name)
        block, kind = (m.group(1), m.group(2).rpartition(".")[2]) if m else (t.name, "layer")
        rows.setdefault(block, {})[kind] = _label(plan.setting(i))
    kinds = list(dict.fromkeys(k for cells in rows.values() for k in cells))
    width = max([len(k) for k in kinds] + [6])
    lines = ["block " + " ".join(f"{k:>{width}}" for k in kinds)]
    lines += [f"{b:>5} " + " ".join(f"{cells.get(k, '-'):>{width}}" for k in kinds) for b, cells in rows.items()]
    bpw = 8.0 * plan.linear_bytes / plan.linear_params
    lines.append(
        f"cells: bits[/group][a]; no /group = one scale per row; a = asymmetric (min-max) grid. "
        f"{bpw:.3f} bits/weight over the linears, predicted loss increase {plan.predicted_loss:.4g} "
        f"(lower bound {plan.lower_bound:.4g})"
    )
    if plan.embedding_choice is not None:
        lines.append(f"embedding and head: {plan.embedding.settings[plan.embedding_choice]}")
    return "\n".join(lines)


def planned_linears(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """The decoder linears ``config`` quantizes (the output head excluded), by module name."""
    heads = output_head_names(model)
    return {
        n: m for n, m in model.named_modules() if n not in heads and is_linear(m) and config.spec_for(n) is not None
    }


def _oriented(module: nn.Module, fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, Fisher) as (out, in), also for GPT-2's Conv1D whose parameter is (in, out)."""
    weight, _ = linear_weight(module)
    return weight, fisher if isinstance(module, nn.Linear) else fisher.t()


def make_plan(method, model: nn.Module, config: QuantConfig, tokenizer, progress: bool = True) -> Plan:
    """Sensitivities of every planned item, then the allocation within ``method``'s budget."""
    tables, emb_table = sensitivity_tables(method, model, config, tokenizer, progress)
    return plan_from_tables(method, model, config, tables, emb_table)


def sensitivity_tables(method, model: nn.Module, config: QuantConfig, tokenizer, progress: bool = True):
    """(one :class:`LayerTable` per planned decoder linear, the embedding's table or None without a file
    budget), from the Fisher diagonal on ``method.fisher_tokens`` calibration tokens."""
    targets = planned_linears(model, config)
    if not targets:
        raise LowbitError("no linear layer matched the include/exclude patterns: nothing to plan")
    weights = {name: m.weight for name, m in targets.items()}
    embeddings = _embedding_modules(model) if method.budget_mb is not None else {}
    weights.update({name: m.weight for name, m in embeddings.items()})
    windows = calibration_windows(tokenizer, method.calib, method.fisher_tokens, method.seq_len)
    fisher = fisher_diagonal(model, windows, weights, progress)
    candidates = [Setting.parse(c) for c in method.candidates]
    tables = [
        layer_table(name, [_oriented(m, fisher.pop(name))], candidates, config.scale_search)
        for name, m in tqdm(targets.items(), desc="sensitivities", disable=not progress, unit="layer")
    ]
    if not embeddings:
        return tables, None
    emb_tensors = [(m.weight, fisher[name]) for name, m in embeddings.items()]
    emb_candidates = [Setting.parse(c) for c in EMBEDDING_CANDIDATES]
    return tables, layer_table("embeddings", emb_tensors, emb_candidates, config.scale_search)


def plan_from_tables(method, model, config: QuantConfig, tables: list[LayerTable], emb_table) -> Plan:
    """The allocation of ``method``'s budget over ``tables`` (and the embedding's, for a file budget)."""
    params = sum(t.params for t in tables)
    bpw_bytes = None if method.budget_bpw is None else int(method.budget_bpw * params / 8)
    if method.budget_mb is not None:
        return _plan_file(method, model, config, tables, emb_table, bpw_bytes)
    knapsack = Knapsack([t.nbytes for t in tables], [t.loss for t in tables], bpw_bytes)
    if not knapsack.feasible(bpw_bytes):
        raise LowbitError(
            f"a budget of {method.budget_bpw:g} bits per weight is below the smallest plan "
            f"({8 * min_bytes(knapsack.costs) / params:.3f}): add cheaper candidates or raise --budget-bpw"
        )
    alloc = knapsack.solve(bpw_bytes)
    return Plan(tables, alloc.choice, bpw_bytes, alloc.lower_bound)


def _embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The input embedding and, when it has its own weight, the output head (one setting for both)."""
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    found = {n: m for n, m in model.named_modules() if m is inp}
    if out is not None and out.weight is not inp.weight:
        found.update({n: m for n, m in model.named_modules() if m is out})
    return found


def _hp_bytes(config: QuantConfig) -> int:
    return torch.empty(0, dtype=HP_DTYPES[config.hp_dtype]).element_size()


def _fixed_bytes(model: nn.Module, config: QuantConfig, planned: list[nn.Parameter]) -> tuple[int, int]:
    """(tensor bytes, header bound) of the file beyond the planned tensors: every other parameter and
    persistent buffer (tied ones once) as :func:`lowbit.store.folder.build_state` stores them, and an upper
    bound on the safetensors header that lists every tensor."""
    skip = {id(p) for p in planned}
    seen: set[int] = set()
    tensors, header = 0, 8 + 1024  # header length field and metadata
    for key, t in model.state_dict(keep_vars=True).items():
        entries = 3 if id(t) in skip else 1  # a planned weight becomes qweight, step, zero
        header += entries * (len(key) + 16 + HEADER_BYTES_PER_TENSOR)
        if id(t) in skip or id(t) in seen:
            continue
        seen.add(id(t))
        tensors += t.numel() * (_hp_bytes(config) if t.is_floating_point() else t.element_size())
    return tensors, header


def _plan_file(method, model, config, tables: list[LayerTable], emb: LayerTable, bpw_bytes) -> Plan:
    """Plan for a whole-file budget: the linears' knapsack solved once, read off at the budget each
    embedding option (high precision, or one of :data:`EMBEDDING_CANDIDATES`: 8, 6 or 4 bits) leaves them.
    The embedding stays in high precision if the linears then fit; otherwise the quantized option with the
    least total predicted loss wins."""
    embeddings = _embedding_modules(model)
    hp_emb = emb.params * _hp_bytes(config)
    planned = [m.weight for m in planned_linears(model, config).values()] + [m.weight for m in embeddings.values()]
    fixed, header = _fixed_bytes(model, config, planned)
    fixed += header  # the budget covers the file: the tensors and their header
    file_budget = int(method.budget_mb * 1e6)
    full = fixed + hp_emb + sum(t.params for t in tables) * _hp_bytes(config)
    if file_budget >= full:
        raise LowbitError(
            f"the full-precision file ({full / 1e6:.2f} MB) fits {method.budget_mb:g} MB: use full precision"
        )
    options = [(None, hp_emb, 0.0)] + [(c, emb.nbytes[c], emb.loss[c]) for c in range(len(emb.settings))]
    limits = [file_budget - fixed - b for _, b, _ in options]
    if bpw_bytes is not None:
        limits = [min(limit, bpw_bytes) for limit in limits]
    knapsack = Knapsack([t.nbytes for t in tables], [t.loss for t in tables], max(limits))
    scored = [
        (knapsack.best[limit // knapsack.unit] + loss, i)
        for i, ((_, _, loss), limit) in enumerate(zip(options, limits, strict=True))
        if knapsack.feasible(limit)
    ]
    if not scored:
        smallest = fixed + min_bytes(knapsack.costs) + min(b for _, b, _ in options)
        raise LowbitError(
            f"a budget of {method.budget_mb:g} MB is below the smallest file ({smallest / 1e6:.2f} MB"
            + (f" within {method.budget_bpw:g} bits per weight" if bpw_bytes is not None else "")
            + ")"
        )
    # high precision whenever it fits: the Fisher of embedding rows the calibration text never reads is
    # zero, so their predicted loss is too low to trade against the linears'
    _, best = scored[0] if scored[0][1] == 0 else min(scored)
    alloc = knapsack.solve(limits[best])
    return Plan(
        tables, alloc.choice, limits[best], alloc.lower_bound + options[best][2],
        embedding=emb, embedding_choice=options[best][0], hp_embedding_bytes=hp_emb,
        fixed_bytes=fixed - header, header_bytes=header,
    )  # fmt: skip


def achieved(model: nn.Module, plan: Plan) -> dict:
    """The quantized model's bytes as stored: the planned linears' (bits per weight) and the tensors' total."""
    tensors, _ = build_state(model)
    names = {t.name for t in plan.tables}
    linear = 0
    for key, t in tensors.items():
        owner, _, part = key.rpartition(".")
        if owner in names and part in ("qweight", "step", "zero"):
            linear += t.numel() * t.element_size()
    return {
        "bits_per_weight_linear": 8.0 * linear / plan.linear_params,
        "linear_bytes": linear,
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
