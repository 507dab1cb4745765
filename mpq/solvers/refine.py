"""Coordinate descent on the measured quality of the whole plan, from the ILP plan (numpy only).

The ILP optimizes the table's additive model: one damage per (decision, option), each measured
with every other layer at full precision, summed. The real damage of a plan is not additive
(errors of several layers interact). This refinement re-measures each decision's neighbouring
options *with the rest of the current plan applied* and re-solves on those in-context numbers:

1. **Start**: the ILP plan of the table (or a given feasible choice); measure it.
2. **Probe**: for every decision (or the ``candidates`` whose table damage changes most per
   unit of cost), measure the plan with that decision one rung down and one rung up its ladder
   (:func:`mpq.solvers.measure.ladders`; cached, so nothing is measured twice). Each probe's
   measured change is that move's damage in the context of the current plan.
3. **Re-solve**: a problem with the same costs and budget whose options per decision are only
   stay (0), the measured one-rung-down and one-rung-up changes (shifted per decision so the
   smallest is 0: the same argmin), solved exactly with the ILP. Its plan combines the moves
   that, to first order around the current plan, lower the measured value within the budget.
4. **Accept** it when it measures lower. Otherwise try the ``fallback`` best budget-keeping
   single swaps (one decision down, one up) by predicted change; accept the first that
   measures lower. Stop after ``rounds`` rounds or when nothing improves.

The result is never worse than the start on the measure. ``stats`` report the measured values
of the start and the final plan (``start_measured``, ``measured``), the table's additive
prediction of both (``start_predicted``, ``predicted``: the summed distortions), the number of
plans measured (``evaluations``) and the rounds run.
"""

from __future__ import annotations

import time

import numpy as np

from mpq.errors import MpqError
from mpq.solvers._common import done
from mpq.solvers._start import start_choice
from mpq.solvers.base import AllocationProblem, Solution, validate_problem
from mpq.solvers.measure import CachedMeasure, Measure, Search, cached, ladders, weighted_cost
from mpq.solvers.options import Features, SearchOptions


def _neighbours(lad: list[np.ndarray], rung: np.ndarray, choice: np.ndarray, d: int) -> list[int]:
    k = int(rung[d, int(choice[d])])
    return [int(lad[d][j]) for j in (k - 1, k + 1) if 0 <= j < len(lad[d])]


def _probe_order(
    problem: AllocationProblem, choice: np.ndarray, candidates: int | None
) -> list[int]:
    """Decisions to probe: all, or the ``candidates`` whose table damage changes most per unit
    of weighted cost between their neighbouring rungs (the moves that matter most)."""
    n = len(problem.decisions)
    if candidates is None or candidates >= n:
        return list(range(n))
    w = weighted_cost(problem)
    lad = ladders(problem)
    rung = _rungs(problem, lad)
    score = np.zeros(n)
    for d in range(n):
        o = int(choice[d])
        for nb in _neighbours(lad, rung, choice, d):
            dc = abs(float(w[d, nb] - w[d, o]))
            dd = abs(float(problem.distortion[d, nb] - problem.distortion[d, o]))
            if dc > 0:
                score[d] = max(score[d], dd / dc)
    return sorted(np.argsort(-score, kind="stable")[:candidates].tolist())


def _rungs(problem: AllocationProblem, lad: list[np.ndarray]) -> np.ndarray:
    rung = np.full(problem.distortion.shape, -1, dtype=np.int64)
    for d, ladder in enumerate(lad):
        rung[d, ladder] = np.arange(len(ladder))
    return rung


def _local_problem(
    problem: AllocationProblem, choice: np.ndarray, deltas: dict[tuple[int, int], float]
) -> AllocationProblem:
    """Stay (0) or one probed move per decision, with the measured changes as distortions."""
    n, m = problem.distortion.shape
    dist = np.full((n, m), np.inf)
    dist[np.arange(n), choice] = 0.0
    for (d, o), delta in deltas.items():
        dist[d, o] = delta
    dist -= dist.min(axis=1, keepdims=True)
    return AllocationProblem(
        problem.decisions, problem.options, dist, problem.costs, problem.limits
    )


def _swaps(
    problem: AllocationProblem, choice: np.ndarray, deltas: dict[tuple[int, int], float]
) -> list[tuple[float, np.ndarray]]:
    """Budget-keeping single moves and (down, up) pairs, by predicted change, best first."""
    moves = sorted(deltas.items(), key=lambda kv: kv[1])
    out: list[tuple[float, np.ndarray]] = []
    for (d, o), delta in moves:
        c = choice.copy()
        c[d] = o
        if problem.feasible(c) and delta < 0:
            out.append((delta, c))
    w = weighted_cost(problem)
    downs = [(k, v) for k, v in moves if w[k[0], k[1]] < w[k[0], int(choice[k[0]])]]
    ups = [(k, v) for k, v in moves if w[k[0], k[1]] > w[k[0], int(choice[k[0]])]]
    for (a, oa), va in downs[:32]:
        for (b, ob), vb in ups[:32]:
            if a == b or va + vb >= 0:
                continue
            c = choice.copy()
            c[a], c[b] = oa, ob
            if problem.feasible(c):
                out.append((va + vb, c))
    return sorted(out, key=lambda t: t[0])


def solve_refine(
    problem: AllocationProblem,
    measure: Measure | None = None,
    *,
    rounds: int = 2,
    candidates: int | None = None,
    fallback: int = 3,
    start: np.ndarray | None = None,
) -> Solution:
    """Refine ``start`` (default: the ILP plan) on ``measure`` (lower is better; default the
    table's summed distortion) by in-context coordinate descent (module docstring). Status
    ``feasible``, or ``infeasible`` (with ``min_feasible``) when no plan fits the budget."""
    from mpq.solvers.ilp import solve_ilp

    t0 = time.perf_counter()
    validate_problem(problem)
    if not problem.limits:
        raise MpqError("refine needs a budget on at least one resource")
    for name, count in (("rounds", rounds), ("fallback", fallback)):
        if int(count) != count or count < 0:
            raise MpqError(f"refine: {name}={count} must be an integer >= 0")
    if candidates is not None and (int(candidates) != candidates or candidates < 1):
        raise MpqError(f"refine: candidates={candidates} must be a positive integer (or None)")
    begun = start_choice(problem, start, "refine", t0)
    if isinstance(begun, Solution):
        return begun
    choice, origin = begun
    score: CachedMeasure = cached(measure, problem)
    lad = ladders(problem)
    rung = _rungs(problem, lad)
    value = score(choice)
    start_value, first = value, choice.copy()
    ran = 0
    for _ in range(rounds):
        ran += 1
        deltas: dict[tuple[int, int], float] = {}
        for d in _probe_order(problem, choice, candidates):
            for o in _neighbours(lad, rung, choice, d):
                probe = choice.copy()
                probe[d] = o
                deltas[(d, o)] = score(probe) - value
        proposals: list[np.ndarray] = []
        local = solve_ilp(_local_problem(problem, choice, deltas))
        if local.status != "infeasible" and not np.array_equal(local.choice, choice):
            proposals.append(np.asarray(local.choice, dtype=np.int64))
        proposals += [c for _, c in _swaps(problem, choice, deltas)[:fallback]]
        improved = False
        for c in proposals:
            if not problem.feasible(c):
                continue
            v = score(c)
            if v < value:
                choice, value, improved = c, v, True
                break
        if not improved:
            break
    stats = {
        "start": origin,
        "start_measured": start_value,
        "measured": value,
        "start_predicted": problem.distortion_of(first),
        "predicted": problem.distortion_of(choice),
        "improved": value < start_value,
        "rounds": ran,
        "evaluations": score.calls,
        "changed_decisions": int((choice != first).sum()),
    }
    return done(problem, choice, "feasible", "refine", t0, stats)


def from_options(opts: SearchOptions, features: Features) -> Search:
    """The ``refine`` search of :data:`mpq.registry.SEARCHES`: ``opts.rounds`` rounds probing
    ``opts.probes`` decisions (all when None)."""

    def search(problem: AllocationProblem, measure: Measure | None = None) -> Solution:
        return solve_refine(problem, measure, rounds=opts.rounds, candidates=opts.probes)

    return search
