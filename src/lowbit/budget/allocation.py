"""Choose one setting per layer to minimise the predicted loss within a byte budget.

This is the multiple-choice knapsack problem (every layer takes exactly one of its candidates). It is
solved by dynamic programming over the byte budget in units of ``unit`` bytes, each candidate's bytes
rounded *up* to whole units: the plan found is optimal for the rounded costs, so it always fits the
budget in true bytes, and it is at least as good as the true optimum at a budget smaller by
``layers * unit`` bytes. The unit is fixed by the tables (not by the budget), so a larger budget never
gives a worse plan. The Lagrangian relaxation (one price ``lam`` per byte, each layer then choosing
``argmin loss + lam * bytes`` alone; maximised over ``lam`` by bisection) gives a lower bound on the
optimum, reported as the plan's certified gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

RESOLUTION = 1 << 18  # budget units across the largest possible plan: slack <= layers / 2**18 of it


@dataclass
class Allocation:
    """The chosen candidate index per layer, its bytes and predicted loss, and the Lagrangian lower
    bound on the best predicted loss any plan within the budget can have."""

    choice: list[int]
    nbytes: int
    loss: float
    lower_bound: float


def cost_unit(costs: list[list[int]], resolution: int = RESOLUTION) -> int:
    """Bytes per budget unit: the largest possible plan spans about ``resolution`` units."""
    return max(1, math.ceil(sum(max(c) for c in costs) / resolution))


def min_bytes(costs: list[list[int]]) -> int:
    return sum(min(c) for c in costs)


class Knapsack:
    """The dynamic program over budgets up to ``max_budget`` bytes, solved once; :meth:`solve` reads
    off the best plan for any budget up to it (the embedding options of a file budget each leave the
    linears a different budget)."""

    def __init__(self, costs: list[list[int]], losses: list[list[float]], max_budget: int, unit: int | None = None):
        self.costs, self.losses = costs, losses
        self.unit = unit or cost_unit(costs)
        self.units = [np.array([-(-c // self.unit) for c in row], dtype=np.int64) for row in costs]
        size = max(0, max_budget) // self.unit + 1
        best = np.zeros(size)  # best[s]: least loss of the layers so far within s units
        widest = max(len(row) for row in costs)
        self.picks = np.zeros((len(costs), size), dtype=np.int8 if widest < 127 else np.int16)
        for i, (k, loss) in enumerate(zip(self.units, losses, strict=True)):
            new = np.full(size, np.inf)
            for c in np.argsort(k, kind="stable"):  # cheaper candidates win ties
                if k[c] >= size:
                    continue
                cand = np.full(size, np.inf)
                cand[k[c] :] = best[: size - k[c]] + loss[c]
                better = cand < new
                new[better] = cand[better]
                self.picks[i, better] = c
            best = new
        self.best = best

    def feasible(self, budget: int) -> bool:
        s = budget // self.unit
        return 0 <= s < len(self.best) and bool(np.isfinite(self.best[s]))

    def solve(self, budget: int) -> Allocation:
        """The plan of least total loss whose total bytes fit ``budget`` (see the module docstring)."""
        if not self.feasible(budget):
            smallest = min_bytes(self.costs)
            raise LowbitError(f"the budget of {budget} bytes is below the smallest plan ({smallest} bytes)")
        choice, s = [0] * len(self.costs), budget // self.unit
        for i in range(len(self.costs) - 1, -1, -1):
            choice[i] = int(self.picks[i, s])
            s -= int(self.units[i][choice[i]])
        nbytes = sum(self.costs[i][c] for i, c in enumerate(choice))
        loss = sum(self.losses[i][c] for i, c in enumerate(choice))
        return Allocation(choice, nbytes, loss, lagrangian_bound(self.costs, self.losses, budget))


def allocate(costs: list[list[int]], losses: list[list[float]], budget: int, unit: int | None = None) -> Allocation:
    """The plan of least total loss whose total bytes fit ``budget`` (see the module docstring)."""
    return Knapsack(costs, losses, budget, unit).solve(budget)


def lagrangian_bound(costs: list[list[int]], losses: list[list[float]], budget: int, steps: int = 100) -> float:
    """``max over lam >= 0`` of ``sum_i min_c (loss_ic + lam * bytes_ic) - lam * budget``, a lower bound
    on the optimum of the knapsack; the maximum is found by bisection on the slope's sign."""
    c = [np.asarray(row, dtype=np.float64) for row in costs]
    v = [np.asarray(row, dtype=np.float64) for row in losses]

    def dual(lam: float) -> tuple[float, float]:
        value, used = -lam * budget, 0.0
        for ci, vi in zip(c, v, strict=True):
            j = int(np.argmin(vi + lam * ci))
            value += vi[j] + lam * ci[j]
            used += ci[j]
        return value, used

    value, used = dual(0.0)
    if used <= budget:
        return value  # every layer at its best fits: the bound is the optimum
    lo, hi = 0.0, 1.0
    while dual(hi)[1] > budget:
        hi *= 2.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if dual(mid)[1] > budget else (lo, mid)
    return max(dual(lo)[0], dual(hi)[0])
