"""The solver interface: `AllocationProblem` (pure numpy data) and `Solution`.

A problem has ``D`` decisions (targets or tie groups) and ``O`` candidate options (formats)
shared by all decisions. ``distortion[d, o]`` is what option ``o`` costs decision ``d`` in
quality (``inf`` = not allowed); ``costs[r][d, o]`` is its use of resource ``r``; a plan is
feasible when ``sum_d costs[r][d, choice[d]] <= limits[r]`` for every budgeted resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mpq.solvers.validate import check_problem_data

STATUSES = ("optimal", "feasible", "infeasible", "time_limit")


@dataclass(frozen=True)
class AllocationProblem:
    decisions: tuple[str, ...]
    options: tuple[str, ...]
    distortion: np.ndarray
    costs: Mapping[str, np.ndarray]
    limits: Mapping[str, float]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_problem_data(self.decisions, self.options, self.distortion, self.costs, self.limits)

    @property
    def allowed(self) -> np.ndarray:
        return np.isfinite(self.distortion)

    def cost_of(self, choice: np.ndarray) -> dict[str, float]:
        idx = np.arange(len(self.decisions))
        return {r: float(c[idx, choice].sum()) for r, c in self.costs.items()}

    def distortion_of(self, choice: np.ndarray) -> float:
        return float(self.distortion[np.arange(len(self.decisions)), choice].sum())

    def feasible(self, choice: np.ndarray, rtol: float = 1e-12) -> bool:
        if not self.allowed[np.arange(len(self.decisions)), choice].all():
            return False
        used = self.cost_of(choice)
        return all(used[r] <= lim * (1 + rtol) for r, lim in self.limits.items())

    def min_costs(self) -> dict[str, float]:
        """Per budgeted resource, the least any plan can use (a lower bound on every budget)."""
        out = {}
        for r in self.limits:
            c = np.where(self.allowed, self.costs[r], np.inf)
            out[r] = float(c.min(axis=1).sum())
        return out


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray
    status: str
    objective: float
    costs: Mapping[str, float]
    solver: str
    wall_time: float
    stats: Mapping[str, Any] = field(default_factory=dict)
    min_feasible: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")


class Solver(Protocol):
    def __call__(self, problem: AllocationProblem) -> Solution: ...


def infeasible(problem: AllocationProblem, solver: str, wall: float) -> Solution:
    """The infeasible status, with the smallest budget per resource that any plan meets."""
    return Solution(
        choice=np.full(len(problem.decisions), -1),
        status="infeasible",
        objective=float("inf"),
        costs={},
        solver=solver,
        wall_time=wall,
        min_feasible=problem.min_costs(),
    )


def validate_problem(problem: AllocationProblem) -> AllocationProblem:
    """Check a built problem (:func:`mpq.solvers.validate.check_problem_data`); returns it
    unchanged. Every solver calls it first."""
    check_problem_data(
        problem.decisions, problem.options, problem.distortion, problem.costs, problem.limits
    )
    return problem
