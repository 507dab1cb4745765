"""Measured quality for the search solvers (numpy only).

A *measure* is a callable ``measure(choice) -> float`` that scores the plan a choice (one option
index per decision) stands for; lower is better (e.g. the calibration KL of the quantized model,
built on the torch side by :mod:`mpq.calib_measure`). The searches (``bayes``, ``evolution``,
``sac``) and the uniform guard take one; ``None`` means the problem's own summed distortion
(:func:`table_measure`), which is what the conformance suite runs them on.

:class:`CachedMeasure` wraps a measure so that no choice is measured twice (measured quality is
the expensive part); every search wraps the measure it is given (a measure already cached is
used as is, so a cache can be shared by several searches and the guard).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from mpq.errors import MpqError
from mpq.solvers.base import AllocationProblem, Solution

Measure = Callable[[np.ndarray], float]


class Search(Protocol):
    """A solver that searches on measured quality: ``(problem, measure) -> Solution``."""

    def __call__(self, problem: AllocationProblem, measure: Measure | None = None) -> Solution: ...


def table_measure(problem: AllocationProblem) -> Measure:
    """The problem's own additive model: the summed distortion of a choice."""

    def measure(choice: np.ndarray) -> float:
        return problem.distortion_of(np.asarray(choice, dtype=np.int64))

    return measure


class CachedMeasure:
    """A measure with a cache of every choice it has scored.

    ``calls`` counts the measurements actually made, ``hits`` the answers served from the
    cache. A non-finite measurement is an :class:`MpqError` (a search cannot rank it)."""

    def __init__(self, fn: Measure, n_decisions: int | None = None) -> None:
        self.fn = fn
        self.n_decisions = n_decisions
        self.cache: dict[tuple[int, ...], float] = {}
        self.calls = 0
        self.hits = 0

    @staticmethod
    def key(choice: np.ndarray) -> tuple[int, ...]:
        return tuple(int(c) for c in np.asarray(choice).ravel())

    def __call__(self, choice: np.ndarray) -> float:
        key = self.key(choice)
        if self.n_decisions is not None and len(key) != self.n_decisions:
            raise MpqError(
                f"a choice of {len(key)} options was measured on a problem of "
                f"{self.n_decisions} decisions"
            )
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        value = float(self.fn(np.array(key, dtype=np.int64)))
        if not math.isfinite(value):
            raise MpqError(
                f"the measure returned {value} for choice {list(key)[:8]}...: a measure must "
                f"return a finite number (lower is better)"
            )
        self.calls += 1
        self.cache[key] = value
        return value

    def __contains__(self, choice: np.ndarray) -> bool:
        return self.key(choice) in self.cache

    def __len__(self) -> int:
        return len(self.cache)

    def items(self) -> Iterator[tuple[tuple[int, ...], float]]:
        return iter(self.cache.items())


def cached(measure: Measure | None, problem: AllocationProblem) -> CachedMeasure:
    """``measure`` with a cache (the table's distortion when ``None``; an existing
    :class:`CachedMeasure` is returned unchanged, so its cache is shared)."""
    if isinstance(measure, CachedMeasure):
        return measure
    fn = table_measure(problem) if measure is None else measure
    return CachedMeasure(fn, len(problem.decisions))


def weighted_cost(problem: AllocationProblem) -> np.ndarray:
    """One scalar per (decision, option): every budgeted resource over its limit, summed
    (``inf`` where the option is not allowed). Orders the options of a decision by cost."""
    total = np.zeros(problem.distortion.shape, dtype=float)
    for r, lim in problem.limits.items():
        total += np.asarray(problem.costs[r], dtype=float) / max(abs(float(lim)), 1e-300)
    return np.where(problem.allowed, total, np.inf)


def ladders(problem: AllocationProblem) -> list[np.ndarray]:
    """Per decision, its allowed options from the cheapest to the dearest (weighted cost;
    ties: the more distorting option first, then the lower index)."""
    w = weighted_cost(problem)
    out = []
    for d in range(len(problem.decisions)):
        ok = np.flatnonzero(problem.allowed[d])
        order = np.lexsort((ok, -problem.distortion[d, ok], w[d, ok]))
        out.append(ok[order].astype(np.int64))
    return out


def uniform_choices(problem: AllocationProblem) -> list[np.ndarray]:
    """Every uniform choice that is allowed for all decisions and fits the budget."""
    n = len(problem.decisions)
    out = []
    for o in range(len(problem.options)):
        choice = np.full(n, o, dtype=np.int64)
        if problem.feasible(choice):
            out.append(choice)
    return out


def start_plans(problem: AllocationProblem) -> tuple[Solution, list[tuple[str, np.ndarray]]]:
    """The table's best plans, to start a search from: the ILP optimum, the greedy plan and
    the best uniform plan that fits (duplicates dropped, in that order), with the ILP solution
    itself (``infeasible`` when no plan fits: the caller returns that status)."""
    from mpq.solvers.greedy import solve_greedy
    from mpq.solvers.ilp import solve_ilp
    from mpq.solvers.uniform import solve_uniform

    ilp = solve_ilp(problem)
    if ilp.status == "infeasible":
        return ilp, []
    out: list[tuple[str, np.ndarray]] = [("ilp", np.asarray(ilp.choice, dtype=np.int64))]
    for name, sol in (("greedy", solve_greedy(problem)), ("uniform", solve_uniform(problem))):
        if sol.status == "infeasible" or not problem.feasible(sol.choice):
            continue
        choice = np.asarray(sol.choice, dtype=np.int64)
        if not any(np.array_equal(choice, c) for _, c in out):
            out.append((name, choice))
    return ilp, out
