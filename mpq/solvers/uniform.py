"""Uniform allocation: every decision gets the same option; the best one that fits the budget."""

from __future__ import annotations

import time

import numpy as np

from mpq.solvers._common import done
from mpq.solvers.base import AllocationProblem, Solution, infeasible


def solve_uniform(problem: AllocationProblem) -> Solution:
    """The feasible uniform choice with the lowest distortion (ties: the cheaper one)."""
    t0 = time.perf_counter()
    n = len(problem.decisions)
    best: tuple[float, float, int] | None = None
    for o in range(len(problem.options)):
        choice = np.full(n, o)
        if not problem.feasible(choice):
            continue
        total_cost = sum(problem.cost_of(choice).values())
        key = (problem.distortion_of(choice), total_cost, o)
        if best is None or key < best:
            best = key
    if best is None:
        return infeasible(problem, "uniform", time.perf_counter() - t0)
    choice = np.full(n, best[2])
    return done(problem, choice, "feasible", "uniform", t0, {"option": problem.options[best[2]]})
