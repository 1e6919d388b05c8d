"""Path planning: the k computed steps that minimise a measured cost, exactly, for every budget at once.

A schedule of ``k`` computed steps ``0 = s_0 < s_1 < ... < s_{k-1} < T`` is a path ``s_0 -> s_1 -> ... -> s_{k-1}
-> T`` of ``k`` edges in the DAG over ``0..T``; edge ``i -> j`` stands for "computed at ``i``, cached until ``j``"
and costs ``cost[i, j]``, the error that segment alone causes in the final output (``cost_table.py``, LeMiCa's
edge, arXiv 2511.00090). Two objectives, both exact:

- ``sum`` (DPCache-style total cost, arXiv 2602.22654): ``D[e][j] = min_i D[e-1][i] + cost[i, j]``, ``D[0][0] = 0``;
  the best ``k``-pass schedule is the argmin path of ``D[k][T]``. One pass of ``O(k_max T^2)`` gives every ``k``.
- ``minimax`` (LeMiCa's lexicographic minimax): paths compared by their edge costs sorted in decreasing order,
  lexicographically (the largest edge first, then the next, ...). The order is kept by appending the same edges to
  two paths, so the same recursion with sorted tuples for values is exact.

Ours: edge costs measured once with full compute outside the segment (LeMiCa's definition; DPCache's cost tensor
also conditions on the previous key step, which costs ``T`` times more rollouts); ties go to the earlier step.
"""

from __future__ import annotations

import math

import torch

from recache.errors import RecacheError
from recache.schedule import Schedule, check_budget

OBJECTIVES = ("sum", "minimax")


def plan_sum(cost: torch.Tensor, k_max: int) -> dict[int, tuple[int, ...]]:
    """The computed steps minimising the total edge cost, for every budget ``1..k_max`` (``cost`` is ``(T+1, T+1)``,
    read above the diagonal)."""
    T = cost.shape[0] - 1
    edges = torch.full_like(cost, math.inf, dtype=torch.float64)
    upper = torch.triu(torch.ones_like(edges, dtype=torch.bool), diagonal=1)
    edges[upper] = cost.double()[upper]
    best = torch.full((k_max + 1, T + 1), math.inf, dtype=torch.float64)
    best[0, 0] = 0.0
    came_from = torch.zeros((k_max + 1, T + 1), dtype=torch.long)
    for e in range(1, k_max + 1):
        best[e], came_from[e] = (best[e - 1][:, None] + edges).min(0)  # min takes the first (earliest) of ties
    return {k: _walk_back(came_from, k, T) for k in range(1, k_max + 1)}


def plan_minimax(cost: torch.Tensor, k_max: int) -> dict[int, tuple[int, ...]]:
    """The computed steps whose edge costs, sorted in decreasing order, are lexicographically smallest, for every
    budget ``1..k_max``."""
    T, values = cost.shape[0] - 1, cost.double().tolist()
    best: list[list[tuple | None]] = [[None] * (T + 1) for _ in range(k_max + 1)]
    best[0][0] = ()
    came_from = torch.zeros((k_max + 1, T + 1), dtype=torch.long)
    for e in range(1, k_max + 1):
        for j in range(1, T + 1):
            options = [(tuple(sorted(best[e - 1][i] + (values[i][j],), reverse=True)), i)
                       for i in range(j) if best[e - 1][i] is not None]
            if options:
                best[e][j], came_from[e, j] = min(options)
    return {k: _walk_back(came_from, k, T) for k in range(1, k_max + 1)}


def _walk_back(came_from: torch.Tensor, k: int, T: int) -> tuple[int, ...]:
    steps, j = [], T
    for e in range(k, 0, -1):
        j = int(came_from[e, j])
        steps.append(j)
    return tuple(reversed(steps))


def plan_schedules(cost: torch.Tensor, budgets: list[int], objective: str = "sum", **metadata) -> dict[int, Schedule]:
    """One ``Schedule`` per budget, planned on ``cost`` (``(T+1, T+1)``); ``metadata`` goes into each schedule."""
    check_objective(objective)
    T = cost.shape[0] - 1
    for k in budgets:
        check_budget(k, T)
    plans = (plan_sum if objective == "sum" else plan_minimax)(cost, max(budgets))
    return {k: Schedule.from_steps(T, plans[k], source="path", objective=objective,
                                   planned_cost=path_cost(cost, plans[k], objective), **metadata) for k in budgets}


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise RecacheError(f"cost objective {objective!r} is not known; choose one of {', '.join(OBJECTIVES)}")


def path_cost(cost: torch.Tensor, steps: tuple[int, ...], objective: str = "sum") -> float:
    """The planner's cost of a schedule: the sum (or the largest) of its edges' costs."""
    nodes = [*steps, cost.shape[0] - 1]
    edges = [float(cost[i, j]) for i, j in zip(nodes, nodes[1:], strict=False)]
    return sum(edges) if objective == "sum" else max(edges)
