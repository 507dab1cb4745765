"""Greedy allocation by marginal distortion per unit of budget (NNCF / AIMET style).

Start every decision at its least-distorting option. While the budget is exceeded, take the
downgrade (to any cheaper option of any decision) that adds the least distortion per unit of
normalized cost saved. Then spend what is left: take the upgrades that remove the most
distortion per unit of cost added while the plan stays within budget. Not optimal in general
(the ILP is); fast, and a strong baseline when distortions are convex in the cost.
"""

from __future__ import annotations

import time

import numpy as np

from mpq.solvers._common import done
from mpq.solvers.base import AllocationProblem, Solution, infeasible


def _weighted_cost(problem: AllocationProblem) -> np.ndarray:
    """One scalar cost per (decision, option): each budgeted resource divided by its limit."""
    total = np.zeros_like(problem.distortion, dtype=float)
    for r, lim in problem.limits.items():
        total += problem.costs[r] / max(lim, 1e-300)
    return total


def solve_greedy(problem: AllocationProblem) -> Solution:
    t0 = time.perf_counter()
    if not problem.limits:
        raise ValueError("greedy needs a budget on at least one resource")
    mins = problem.min_costs()
    if any(mins[r] > lim * (1 + 1e-12) for r, lim in problem.limits.items()):
        return infeasible(problem, "greedy", time.perf_counter() - t0)
    dist = np.where(problem.allowed, problem.distortion, np.inf)
    wcost = np.where(problem.allowed, _weighted_cost(problem), np.inf)
    n = len(problem.decisions)
    idx = np.arange(n)
    # Least distortion first, cheapest among equals.
    choice = np.lexsort((wcost, dist), axis=1)[:, 0] if n else np.zeros(0, dtype=int)
    steps = 0
    while not problem.feasible(choice):
        cur_d = dist[idx, choice][:, None]
        cur_c = wcost[idx, choice][:, None]
        saved = cur_c - wcost
        added = dist - cur_d
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(saved > 0, np.maximum(added, 0.0) / saved, np.inf)
        ratio = np.where(np.isfinite(dist), ratio, np.inf)
        flat = int(np.argmin(ratio))
        if not np.isfinite(ratio.flat[flat]):
            return infeasible(problem, "greedy", time.perf_counter() - t0)
        d, o = divmod(flat, len(problem.options))
        choice[d] = o
        steps += 1
    while True:
        cur_d = dist[idx, choice][:, None]
        cur_c = wcost[idx, choice][:, None]
        gain = cur_d - dist
        extra = wcost - cur_c
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(
                (gain > 0) & np.isfinite(dist), gain / np.maximum(extra, 1e-300), -np.inf
            )
        order = np.argsort(-ratio, axis=None)
        moved = False
        for flat in order:
            if not np.isfinite(ratio.flat[flat]) or ratio.flat[flat] <= 0:
                break
            d, o = divmod(int(flat), len(problem.options))
            trial = choice.copy()
            trial[d] = o
            if problem.feasible(trial):
                choice = trial
                moved = True
                steps += 1
                break
        if not moved:
            break
    return done(problem, choice, "feasible", "greedy", t0, {"steps": steps})
