"""Exact reductions of the allocation ILP before it is solved (numpy; scipy inside a function).

Two rules, each of which keeps at least one optimal plan in the reduced problem:

- **Dominated options.** Option ``o`` of decision ``d`` is dominated when another option ``p``
  of ``d`` has no more distortion and no more of any budgeted resource (strictly less of
  something, or equal everywhere and a lower index). Replacing ``o`` by ``p`` in any plan keeps
  it within budget and no worse, so an optimum survives without ``o``.
- **Reduced-cost fixing** (the Lagrangian bound of the multiple-choice knapsack; Nauss 1978,
  Pisinger's core algorithms). For multipliers ``lam >= 0`` on the budgets,
  ``L(lam) = sum_d min_o (dist[d, o] + lam . cost[d, o]) - lam . limits`` is a lower bound on
  every feasible plan's distortion (weak duality), and for every feasible plan ``x``::

      distortion(x) >= L(lam) + sum_d rc[d, x_d],
      rc[d, o] = dist[d, o] + lam . cost[d, o] - min_o' (dist[d, o'] + lam . cost[d, o']) >= 0.

  So every plan with distortion ``<= U`` uses only options with ``rc <= U - L(lam)``. The
  multipliers are the LP relaxation's duals (HiGHS through ``scipy.optimize.linprog``); the
  bound and the reduced costs are then recomputed here from ``lam``, so their validity does
  not rest on the LP's tolerances.

`mpq.solvers.ilp` solves the ILP restricted to the options
with ``rc <= delta`` (the *core*, a few per decision), starting with a small ``delta``. When
the core's optimum ``U`` satisfies ``U - L <= delta``, every optimal plan of the full problem
lies in the core, so the core's optimum is the full problem's; otherwise ``delta`` becomes
``U - L`` (or grows when the core has no plan) and the core is solved again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mpq.solvers.base import AllocationProblem


def dominated(problem: AllocationProblem, resources: tuple[str, ...]) -> np.ndarray:
    """Mask ``[D, O]`` of the allowed options dominated by another allowed option of the same
    decision on distortion and every resource in ``resources`` (ties: the lowest index wins)."""
    dist = np.where(problem.allowed, problem.distortion, np.inf)
    costs = [np.asarray(problem.costs[r], float) for r in resources]
    n, m = dist.shape
    out = np.zeros((n, m), dtype=bool)
    for o in range(m):
        for p in range(m):
            if p == o:
                continue
            no_worse = dist[:, p] <= dist[:, o]
            better = (dist[:, p] < dist[:, o]) | (p < o)
            for c in costs:
                no_worse &= c[:, p] <= c[:, o]
                better |= c[:, p] < c[:, o]
            out[:, o] |= no_worse & better & np.isfinite(dist[:, p])
    return out & problem.allowed


@dataclass(frozen=True)
class LagrangeBound:
    """Multipliers ``lam`` (one per budgeted resource, in ``resources`` order), the bound
    ``lower`` they give, and the reduced cost of every option (``inf`` where not allowed)."""

    resources: tuple[str, ...]
    lam: np.ndarray
    lower: float
    reduced: np.ndarray
    lp_value: float
    scale: float

    def tolerance(self) -> float:
        """An absolute slack covering float rounding in ``lower`` and ``reduced`` (a billionth
        of the magnitudes they are sums of)."""
        return 1e-9 * max(self.scale, 1e-300)


def lagrange_bound(
    problem: AllocationProblem, limits: Mapping[str, float], keep: np.ndarray
) -> LagrangeBound | None:
    """The LP relaxation's duals on the budgets (over the options in ``keep``) and the
    Lagrangian bound and reduced costs they give; ``None`` when the LP is not solved to
    optimality (infeasible, or a solver failure: the caller solves the full ILP)."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_array

    resources = tuple(limits)
    dec, opt = np.nonzero(keep)
    n, nv = len(problem.decisions), len(dec)
    one_hot = csr_array((np.ones(nv), (dec, np.arange(nv))), shape=(n, nv))
    a_ub = (
        np.vstack([np.asarray(problem.costs[r], float)[dec, opt] for r in resources])
        if (resources)
        else None
    )
    b_ub = np.array([float(limits[r]) for r in resources]) if resources else None
    res = linprog(
        np.asarray(problem.distortion[dec, opt], float),
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=one_hot,
        b_eq=np.ones(n),
        bounds=(0.0, 1.0),
        method="highs",
    )
    if res.status != 0:
        return None
    lam = np.zeros(len(resources))
    if resources:
        lam = np.maximum(-np.asarray(res.ineqlin.marginals, float), 0.0)
    dist = np.where(keep, problem.distortion, np.inf)
    lagr = dist.copy()
    for mult, r in zip(lam, resources, strict=True):
        lagr = lagr + mult * np.asarray(problem.costs[r], float)
    best = lagr.min(axis=1)
    priced = [mult * float(limits[r]) for mult, r in zip(lam, resources, strict=True)]
    lower = float(best.sum() - sum(priced))
    reduced = np.where(keep, lagr - best[:, None], np.inf)
    scale = float(np.abs(best).sum() + np.abs(priced).sum())
    return LagrangeBound(resources, lam, lower, reduced, float(res.fun), scale)


def core_delta(reduced: np.ndarray, count: int) -> float:
    """The reduced-cost threshold that lets about ``count`` options beyond the LP's own
    (reduced cost 0) into the core."""
    positive = np.sort(reduced[np.isfinite(reduced) & (reduced > 0)])
    if not len(positive):
        return 0.0
    return float(positive[min(count, len(positive)) - 1])
