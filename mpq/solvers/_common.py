"""Small helpers shared by the solvers of this package (numpy only)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from mpq.solvers.base import AllocationProblem, Solution

# Same tolerance as `AllocationProblem.feasible`: a plan may use its limit up to 1e-12 relative.
RTOL = 1e-12


def done(
    problem: AllocationProblem,
    choice: np.ndarray,
    status: str,
    solver: str,
    t0: float,
    stats: Mapping[str, Any] | None = None,
) -> Solution:
    """A solution for a chosen plan; objective and costs are recomputed from the problem."""
    choice = np.asarray(choice, dtype=np.int64)
    return Solution(
        choice=choice,
        status=status,
        objective=problem.distortion_of(choice),
        costs=problem.cost_of(choice),
        solver=solver,
        wall_time=time.perf_counter() - t0,
        stats=dict(stats or {}),
    )


def over_min(problem: AllocationProblem) -> bool:
    """True when some budget is below the least any plan uses (infeasible on its own)."""
    mins = problem.min_costs()
    return any(mins[r] > lim * (1 + RTOL) for r, lim in problem.limits.items())


def excess(problem: AllocationProblem, used: Mapping[str, float]) -> dict[str, float]:
    """Per budgeted resource, how far ``used`` goes over the limit (0 when within it)."""
    return {r: max(0.0, used[r] - lim * (1 + RTOL)) for r, lim in problem.limits.items()}


def allowed_pairs(problem: AllocationProblem) -> tuple[np.ndarray, np.ndarray]:
    """(decision, option) indices of the allowed options, in row-major order."""
    d, o = np.nonzero(problem.allowed)
    return d.astype(np.int64), o.astype(np.int64)


def fill_upgrades(
    problem: AllocationProblem, choice: np.ndarray, weight: Mapping[str, float]
) -> tuple[np.ndarray, int]:
    """Spend what the budget leaves: repeatedly take the upgrade removing the most distortion
    per unit of (weighted) cost added that keeps every resource within its limit."""
    n, m = problem.distortion.shape
    idx = np.arange(n)
    dist = np.where(problem.allowed, problem.distortion, np.inf)
    costs = {r: np.asarray(problem.costs[r], dtype=float) for r in problem.limits}
    wcost = sum((costs[r] * weight[r] for r in problem.limits), np.zeros((n, m)))
    choice = choice.copy()
    used = {r: float(costs[r][idx, choice].sum()) for r in problem.limits}
    moves = 0
    while True:
        gain = dist[idx, choice][:, None] - dist
        extra = wcost - wcost[idx, choice][:, None]
        fits = np.isfinite(dist) & (gain > 0)
        for r, lim in problem.limits.items():
            fits &= used[r] + costs[r] - costs[r][idx, choice][:, None] <= lim * (1 + RTOL)
        if not fits.any():
            return choice, moves
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(extra > 0, gain / extra, np.inf)  # free upgrades first
        ratio = np.where(fits, ratio, -np.inf)
        flat = int(np.argmax(ratio))
        d, o = divmod(flat, m)
        for r in problem.limits:
            used[r] += float(costs[r][d, o] - costs[r][d, choice[d]])
        choice[d] = o
        moves += 1


def repair_downgrades(
    problem: AllocationProblem, choice: np.ndarray
) -> tuple[np.ndarray, int, bool]:
    """Restore feasibility: repeatedly take the downgrade adding the least distortion per unit
    of budget excess removed (excess of each resource relative to its limit, summed).
    Returns the plan, the number of moves and whether it is within every limit."""
    n, m = problem.distortion.shape
    idx = np.arange(n)
    dist = np.where(problem.allowed, problem.distortion, np.inf)
    costs = {r: np.asarray(problem.costs[r], dtype=float) for r in problem.limits}
    scale = {r: 1.0 / max(abs(lim), 1e-300) for r, lim in problem.limits.items()}
    choice = choice.copy()
    moves = 0
    while True:
        used = {r: float(costs[r][idx, choice].sum()) for r in problem.limits}
        over = excess(problem, used)
        if not any(v > 0 for v in over.values()):
            return choice, moves, True
        now = sum(over[r] * scale[r] for r in over)
        after = np.zeros((n, m))
        for r, lim in problem.limits.items():
            new_used = used[r] + costs[r] - costs[r][idx, choice][:, None]
            after += np.maximum(0.0, new_used - lim * (1 + RTOL)) * scale[r]
        reduced = now - after
        added = np.maximum(dist - dist[idx, choice][:, None], 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where((reduced > 0) & np.isfinite(dist), added / reduced, np.inf)
        flat = int(np.argmin(ratio))
        if not np.isfinite(ratio.flat[flat]):
            return choice, moves, False
        d, o = divmod(flat, m)
        choice[d] = o
        moves += 1
