"""Where a refining search (evolution, refine) starts: a given plan or the exact ILP optimum."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.solvers._common import over_min
from mpq.solvers.base import AllocationProblem, Solution, infeasible
from mpq.solvers.ilp import solve_ilp


def start_choice(
    problem: AllocationProblem, start: Any, solver: str, t0: float
) -> tuple[np.ndarray, str] | Solution:
    """Where a refining search (evolution, refine) starts: ``start`` checked to be a feasible
    plan (origin ``"given"``), or else the exact ILP optimum (``"ilp"``). A :class:`Solution`
    instead when the problem is infeasible (over the smallest budget, or by the ILP)."""
    if over_min(problem):
        return infeasible(problem, solver, time.perf_counter() - t0)
    if start is None:
        ilp = solve_ilp(problem)
        if ilp.status == "infeasible":
            return replace(ilp, solver=solver, wall_time=time.perf_counter() - t0)
        return np.asarray(ilp.choice, dtype=np.int64), "ilp"
    choice = np.asarray(start, dtype=np.int64).copy()
    if choice.shape != (len(problem.decisions),) or not problem.feasible(choice):
        raise MpqError(
            f"{solver}: the start choice is not a feasible plan of this problem (one allowed "
            f"option per decision, within every budget)"
        )
    return choice, "given"
