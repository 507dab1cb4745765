"""Evolutionary refinement of a plan on measured quality (EvoPress: Sieberling, Kuznedelev,
Kurtic and Alistarh, "EvoPress: Accuracy-Optimal Model Compression via Evolutionary Search",
2024).

The additive table model (one distortion per decision and option, summed) is what the ILP
optimizes; the real loss of a plan is not additive. EvoPress searches on the measured loss
itself, starting from a good plan, with mutations that keep the compression level:

- **Start**: the ILP plan of the table (or a given feasible choice).
- **Ladders**: each decision's allowed options ordered from the cheapest to the dearest by
  weighted cost (each budgeted resource over its limit, summed).
- **Mutation** (EvoPress's level switch): one decision moves *up* one rung and another moves
  *down* one rung; the move is kept only when every budget still holds (so no offspring ever
  leaves the budget). When the budget has slack, a lone up move is also tried. An offspring
  applies 1..``max_mutations`` such moves (drawn uniformly).
- **Selection**: (mu + lambda) on the measure: each generation makes ``offspring`` children of
  the current ``survivors`` (parents drawn uniformly), measures them (cached: a plan is never
  measured twice) and keeps the ``survivors`` best distinct plans of parents and children.
  The start plan survives until something better is measured, so the result is never worse
  than the start on the measure.
- A fixed number of ``generations``; everything is drawn from ``numpy.random.default_rng(seed)``.

EvoPress's multi-step selection (more calibration tokens for the survivors of a first cheap
round) is left to the measure: pass one that is as precise as the search needs.

The returned :class:`~mpq.solvers.base.Solution` reports the table objective of the plan
(like every solver); the measured value is ``stats["measured"]`` (and ``stats["start_measured"]``
for the start plan).
"""

from __future__ import annotations

import time

import numpy as np

from mpq.errors import MpqError
from mpq.solvers._common import RTOL, done
from mpq.solvers._start import start_choice
from mpq.solvers.base import AllocationProblem, Solution, validate_problem
from mpq.solvers.measure import Measure, cached, ladders
from mpq.solvers.options import Features, Search, SearchOptions


class _Mutator:
    """Budget-keeping moves on a choice, with incremental cost bookkeeping."""

    def __init__(self, problem: AllocationProblem) -> None:
        self.problem = problem
        self.ladder = ladders(problem)
        n = len(problem.decisions)
        self.rung = np.full(problem.distortion.shape, -1, dtype=np.int64)
        for d, lad in enumerate(self.ladder):
            self.rung[d, lad] = np.arange(len(lad))
        self.costs = {r: np.asarray(problem.costs[r], dtype=float) for r in problem.limits}
        self.limits = {r: float(v) * (1 + RTOL) for r, v in problem.limits.items()}
        self.idx = np.arange(n)

    def _used(self, choice: np.ndarray) -> dict[str, float]:
        return {r: float(c[self.idx, choice].sum()) for r, c in self.costs.items()}

    def _step(self, d: int, o: int, up: int) -> int | None:
        lad = self.ladder[d]
        k = int(self.rung[d, o]) + up
        return int(lad[k]) if 0 <= k < len(lad) else None

    def _fits(self, used: dict[str, float], moves: list[tuple[int, int, int]]) -> bool:
        for r, c in self.costs.items():
            total = used[r] + sum(float(c[d, new] - c[d, old]) for d, old, new in moves)
            if total > self.limits[r]:
                return False
        return True

    def mutate(self, choice: np.ndarray, rng: np.random.Generator, moves: int) -> np.ndarray:
        child = choice.copy()
        n = len(child)
        if n == 0:
            return child
        used = self._used(child)
        for _ in range(moves):
            for _attempt in range(32):
                i = int(rng.integers(n))
                up = self._step(i, int(child[i]), +1)
                if up is None:
                    continue
                plan = [(i, int(child[i]), up)]
                if n > 1 and rng.uniform() < 0.75:
                    j = int(rng.integers(n - 1))
                    j += j >= i
                    down = self._step(j, int(child[j]), -1)
                    if down is None:
                        continue
                    plan.append((j, int(child[j]), down))
                if self._fits(used, plan):
                    for d, old, new in plan:
                        for r, c in self.costs.items():
                            used[r] += float(c[d, new] - c[d, old])
                        child[d] = new
                    break
        return child


def solve_evolution(
    problem: AllocationProblem,
    measure: Measure | None = None,
    *,
    generations: int = 50,
    offspring: int = 16,
    survivors: int = 4,
    max_mutations: int = 3,
    seed: int = 0,
    start: np.ndarray | None = None,
) -> Solution:
    """Refine ``start`` (default: the ILP plan) on ``measure`` (lower is better; default the
    table's summed distortion) by (mu + lambda) evolution with budget-keeping mutations; see
    the module docstring. Status ``feasible``, or ``infeasible`` (with ``min_feasible``) when
    no plan fits the budget."""
    t0 = time.perf_counter()
    validate_problem(problem)
    if not problem.limits:
        raise MpqError("evolution needs a budget on at least one resource")
    for name, v in (
        ("generations", generations),
        ("offspring", offspring),
        ("survivors", survivors),
        ("max_mutations", max_mutations),
    ):
        if int(v) != v or v < (0 if name == "generations" else 1):
            raise MpqError(f"evolution: {name}={v} must be a positive integer")
    begun = start_choice(problem, start, "evolution", t0)
    if isinstance(begun, Solution):
        return begun
    first, origin = begun
    score = cached(measure, problem)
    rng = np.random.default_rng(seed)
    mutator = _Mutator(problem)
    # (value, birth order, choice): the birth order breaks ties deterministically.
    born = 0
    population = [(score(first), born, first)]
    seen = {score.key(first)}
    start_value = population[0][0]
    for _gen in range(generations):
        children = []
        for _ in range(offspring):
            parent = population[int(rng.integers(len(population)))][2]
            moves = int(rng.integers(1, max_mutations + 1))
            child = mutator.mutate(parent, rng, moves)
            key = score.key(child)
            if key in seen:
                continue
            seen.add(key)
            born += 1
            children.append((score(child), born, child))
        population = sorted(population + children, key=lambda t: (t[0], t[1]))[:survivors]
    best_value, _, best = population[0]
    if not problem.feasible(best):  # cannot happen: every move is checked
        raise AssertionError("evolution produced a plan over budget")
    stats = {
        "start": origin,
        "start_measured": start_value,
        "measured": best_value,
        "improved": best_value < start_value,
        "generations": generations,
        "evaluations": len(seen),
        "measure_calls": score.calls,
        "seed": seed,
    }
    return done(problem, best, "feasible", "evolution", t0, stats)


def from_options(opts: SearchOptions, features: Features) -> Search:
    """The ``evolution`` search of :data:`mpq.registry.SEARCHES`."""

    def search(problem: AllocationProblem, measure: Measure | None = None) -> Solution:
        return solve_evolution(
            problem, measure, generations=opts.generations, offspring=opts.offspring,
            seed=opts.seed,
        )  # fmt: skip

    return search
