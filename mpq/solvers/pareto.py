"""The whole distortion-vs-cost frontier in one run, by dynamic programming over a discretized
cost of one resource (the Pareto-frontier allocation of HAWQ-V2, Dong et al. 2020, and ZeroQ,
Cai et al. 2020, there by DP over the bit budget), merged with the convex-hull (Lagrangian)
path of the multiple-choice knapsack (Sinha & Zoltners 1979).

The DP. Each decision's costs are first made relative to its cheapest allowed option
(``inc[d, o] = cost[d, o] - min_o cost[d, o]``; the minima are added back at the end), divided
by a *quantum* and rounded **up** to integers ``q[d, o]`` (a positive increment never becomes
0; values within 1e-9 of a multiple snap to it). ``V_d[s]`` = least distortion of decisions
``0..d`` whose ``q`` add up to exactly ``s``: ``V_d[s] = min_o V_{d-1}[s - q[d, o]] +
distortion[d, o]``; frontier candidates are where the prefix minimum of ``V_{D-1}`` drops.
Time ``O(D * O * C)`` with ``C = sum_d max_o q[d, o]`` states.

- The quantum. When every increment is an integer multiple of ``1/k`` for some ``k`` in 1, 2,
  4, ..., 1024 (stored bits are integers, bytes are bits / 8) the quantum is the greatest common
  divisor ``g`` of the increments, and if that keeps ``C <= max_states`` (default 4096) **the
  DP is exact**: the frontier holds an optimal plan for every budget (``exact=True``).
  Otherwise the quantum is raised so ``C`` stays about ``max_states`` (a multiple of ``g`` when
  there is one), or given by the caller, and the DP is exact for the rounded-up costs only: a
  plan it finds for budget ``B`` is at least as good as the true optimum for ``B - D*quantum``.
- Why the hull. With many decisions that bound is loose (1000 decisions x 4096 states: up to
  a quarter of the cost span). The convex-hull path fixes that at no real cost: start every
  decision at its cheapest option; sort the segments of every decision's lower convex hull of
  (cost, distortion) by distortion removed per unit of cost; take them in that order. Each of
  the ``<= D*(O-1) + 1`` plans on the path minimizes ``distortion + lambda * cost`` for some
  ``lambda``, so it is **optimal for its own cost**, and the linear interpolation between
  consecutive path points is the LP relaxation's value (a lower bound, used for the certified
  gap ``stats["gap_bound"]`` of :func:`solve_pareto` and by ``mpq.solvers.bounds``).
- Budgets. Every point stores the **true** cost of its plan (recomputed from its choices; then
  dominated points are dropped) and :meth:`ParetoFrontier.pick` compares budgets with those, so
  a picked plan never exceeds its budget.
- Memory. Traceback needs the argmin option of every (decision, state): ``D x C`` bytes. When
  that exceeds ``max_table_bytes`` (default 32 MiB) only the DP rows at block boundaries are
  kept and each block's table is recomputed during the traceback (twice the time). The frontier
  keeps one plan per point, ``points x D`` int8; past ``max_points`` (default 16384) points it
  keeps the best plan at or below each of ``max_points`` evenly spaced costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.solvers._common import RTOL, done, over_min
from mpq.solvers.base import AllocationProblem, Solution, infeasible, validate_problem


@dataclass(frozen=True)
class FrontierPoint:
    """One plan of a frontier: its position, true cost (frontier resource), distortion."""

    index: int
    cost: float
    distortion: float
    choice: np.ndarray
    optimal: bool


@dataclass(frozen=True)
class HullPath:
    """The convex-hull path of a single-resource multiple-choice knapsack.

    Point 0 is ``start`` (each decision's cheapest option, least distortion among equals);
    point ``k + 1`` is point ``k`` with decision ``decision[k]`` moved to ``option[k]``.
    ``cost`` increases and ``distortion`` decreases along the points; each point is optimal
    for its own cost, and interpolating between points gives the LP relaxation's value.
    """

    start: np.ndarray
    decision: np.ndarray
    option: np.ndarray
    cost: np.ndarray
    distortion: np.ndarray

    def choices(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The plans of points ``rows`` (default all), ``len(rows) x D`` int8/int16."""
        n_pts = len(self.cost)
        rows = np.arange(n_pts) if rows is None else np.asarray(rows)
        n = len(self.start)
        big = n and (int(self.start.max(initial=0)) > 127 or int(self.option.max(initial=0)) > 127)
        out = np.empty((len(rows), n), dtype=np.int16 if big else np.int8, order="F")
        order = np.argsort(self.decision, kind="stable")
        bounds = np.searchsorted(self.decision[order], np.arange(n + 1))
        for d in range(n):
            steps = order[bounds[d] : bounds[d + 1]]  # positions of d's moves, increasing
            values = np.concatenate(([self.start[d]], self.option[steps]))
            out[:, d] = values[np.searchsorted(steps + 1, rows, side="right")]
        return np.ascontiguousarray(out)

    def lower_bound(self, budget: np.ndarray | float) -> np.ndarray:
        """The LP relaxation's least distortion at each budget (``inf`` below the cheapest)."""
        b = np.atleast_1d(np.asarray(budget, float))
        out = np.interp(b, self.cost, self.distortion)
        return np.where(b < self.cost[0] * (1 - RTOL), np.inf, out)


def hull_path(cost: np.ndarray, distortion: np.ndarray) -> HullPath:
    """The convex-hull path for ``cost[d, o]`` and ``distortion[d, o]`` (``inf`` = disallowed).

    Per decision the lower convex hull of its (cost, distortion) points, keeping only strictly
    decreasing distortion; all hull segments sorted by slope (most distortion removed per unit
    of cost first; ties by decision then position, which keeps each decision's own order).
    """
    n = cost.shape[0]
    start = np.zeros(n, dtype=np.int64)
    seg_d: list[int] = []
    seg_k: list[int] = []
    seg_o: list[int] = []
    seg_c: list[float] = []
    seg_v: list[float] = []
    for d in range(n):
        ok = np.flatnonzero(np.isfinite(distortion[d]))
        order = ok[np.lexsort((distortion[d, ok], cost[d, ok]))]
        hull: list[int] = []
        for o in order.tolist():
            c, v = cost[d, o], distortion[d, o]
            if hull and v >= distortion[d, hull[-1]]:
                continue  # no better than a cheaper option: never on the frontier
            while len(hull) >= 2:
                o1, o2 = hull[-2], hull[-1]
                c1, v1 = cost[d, o1], distortion[d, o1]
                # o2 on or above the chord o1 -> o: not on the lower hull
                if (distortion[d, o2] - v1) * (c - c1) >= (v - v1) * (cost[d, o2] - c1):
                    hull.pop()
                else:
                    break
            hull.append(o)
        start[d] = hull[0]
        for k in range(1, len(hull)):
            a, b = hull[k - 1], hull[k]
            seg_d.append(d)
            seg_k.append(k)
            seg_o.append(b)
            seg_c.append(float(cost[d, b] - cost[d, a]))
            seg_v.append(float(distortion[d, b] - distortion[d, a]))
    dc, dv = np.array(seg_c), np.array(seg_v)
    dd, kk = np.array(seg_d, dtype=np.int64), np.array(seg_k, dtype=np.int64)
    slope = dv / dc if len(dc) else dc
    order = np.lexsort((kk, dd, slope)) if len(dc) else np.zeros(0, dtype=np.int64)
    idx = np.arange(n)
    c0 = float(cost[idx, start].sum()) if n else 0.0
    v0 = float(distortion[idx, start].sum()) if n else 0.0
    return HullPath(
        start=start,
        decision=dd[order],
        option=np.array(seg_o, dtype=np.int64)[order],
        cost=np.concatenate(([c0], c0 + np.cumsum(dc[order]))),
        distortion=np.concatenate(([v0], v0 + np.cumsum(dv[order]))),
    )


@dataclass(frozen=True)
class ParetoFrontier:
    """Plans on the distortion-vs-cost frontier of one resource.

    ``cost`` increases and ``distortion`` strictly decreases along the points; ``choices[i]``
    is point ``i``'s option per decision; ``costs[r][i]`` its use of every resource of the
    problem; ``optimal[i]`` whether point ``i`` is proven optimal for its own cost (an exact DP
    point or a hull point). ``exact``: the DP was exact, so :meth:`pick` is optimal for every
    budget. ``hull`` is the convex-hull path (its :meth:`HullPath.lower_bound` is the LP bound).
    """

    resource: str
    cost: np.ndarray
    distortion: np.ndarray
    choices: np.ndarray
    costs: Mapping[str, np.ndarray]
    optimal: np.ndarray
    quantum: float
    states: int
    exact: bool
    hull: HullPath
    stats: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cost)

    def point(self, i: int) -> FrontierPoint:
        return FrontierPoint(
            int(i),
            float(self.cost[i]),
            float(self.distortion[i]),
            self.choices[i].astype(np.int64),
            bool(self.optimal[i]),
        )

    def pick(self, budget: float) -> FrontierPoint | None:
        """The least-distortion point whose true cost is within ``budget`` (same tolerance as
        :meth:`AllocationProblem.feasible`); ``None`` when the budget is below every point."""
        i = int(np.searchsorted(self.cost, budget * (1 + RTOL), side="right")) - 1
        return None if i < 0 else self.point(i)

    def lower_bound(self, budget: float) -> float:
        """The LP relaxation's value at ``budget``: no plan within it has less distortion."""
        return float(self.hull.lower_bound(budget)[0])


def single_resource(problem: AllocationProblem, resource: str | None) -> str:
    if resource is not None:
        if resource not in problem.costs:
            raise MpqError(
                f"resource {resource!r} has no cost table; use one of {sorted(problem.costs)}"
            )
        return resource
    if len(problem.limits) == 1:
        return next(iter(problem.limits))
    if not problem.limits and len(problem.costs) == 1:
        return next(iter(problem.costs))
    raise MpqError(
        f"the Pareto frontier is over one resource; name it (resource=...), one of "
        f"{sorted(problem.costs)}"
    )


def _integral(x: np.ndarray) -> bool:
    return bool(np.all(np.abs(x - np.rint(x)) <= 1e-9 * np.maximum(1.0, np.abs(x))))


def choose_quantum(inc: np.ndarray, max_states: int) -> tuple[float, bool]:
    """A quantum for the increments ``inc[d, o]`` (>= 0; 0 where not allowed) and whether it is
    exact (see the module docstring)."""
    span = float(inc.max(axis=1).sum()) if inc.size else 0.0
    if span <= 0:
        return 1.0, True
    g: float | None = None
    for k in (2.0**e for e in range(11)):
        if _integral(inc * k):
            ints = np.rint(inc * k).astype(np.int64)
            g = float(np.gcd.reduce(ints[ints > 0])) / k
            break
    if g is not None and span / g <= max_states:
        return g, True
    q = span / max_states
    if g is not None:
        q = g * math.ceil(q / g)
    return q, False


def _dp(
    val: np.ndarray, q: np.ndarray, dist: np.ndarray, keep: bool
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the DP over the decisions (rows) of ``q``/``dist`` from the row ``val``."""
    bps: list[np.ndarray] = []
    dtype = np.uint8 if q.shape[1] <= 256 else np.uint16
    for d in range(q.shape[0]):
        allowed = np.flatnonzero(np.isfinite(dist[d]))
        size = len(val) + int(q[d, allowed].max())
        new = np.full(size, np.inf)
        bp = np.zeros(size, dtype=dtype) if keep else None
        for o in allowed.tolist():
            s = int(q[d, o])
            seg = new[s : s + len(val)]
            cand = val + dist[d, o]
            better = cand < seg
            seg[better] = cand[better]
            if bp is not None:
                bp[s : s + len(val)][better] = o
        if bp is not None:
            bps.append(bp)
        val = new
    return val, bps


def _dp_plans(q: np.ndarray, dist: np.ndarray, max_table_bytes: int) -> tuple[np.ndarray, int, int]:
    """The DP's frontier candidates (plans, one row each), the number of states and blocks."""
    n, m = q.shape
    states = int(q.max(axis=1).sum()) + 1 if n else 1
    itemsize = 1 if m <= 256 else 2
    block = max(1, int(max_table_bytes // (states * itemsize)))
    starts = list(range(0, n, block)) or [0]
    single = len(starts) == 1
    rows = [np.zeros(1)]
    kept: list[np.ndarray] = []
    for b in starts:
        val, bps = _dp(rows[-1], q[b : b + block], dist[b : b + block], keep=single)
        rows.append(val)
        kept = bps
    final = rows[-1]
    prev = np.concatenate(([np.inf], np.minimum.accumulate(final)[:-1]))
    state = np.flatnonzero(np.isfinite(final) & (final < prev))
    choices = np.zeros((len(state), n), dtype=np.int16 if m > 128 else np.int8)
    for bi in range(len(starts) - 1, -1, -1):
        b = starts[bi]
        bps = kept if single else _dp(rows[bi], q[b : b + block], dist[b : b + block], True)[1]
        for j in range(len(bps) - 1, -1, -1):
            o = bps[j][state]
            choices[:, b + j] = o
            state = state - q[b + j, o]
    return choices, states, len(starts)


def pareto_frontier(
    problem: AllocationProblem,
    resource: str | None = None,
    *,
    quantum: float | None = None,
    max_states: int = 4096,
    max_table_bytes: int = 32 << 20,
    max_points: int = 16384,
) -> ParetoFrontier:
    """The distortion-vs-cost frontier of ``resource`` (default: the problem's only budgeted
    resource); other budgets are ignored. See the module docstring for the method."""
    t0 = time.perf_counter()
    validate_problem(problem)
    res = single_resource(problem, resource)
    if max_states < 1 or max_points < 2:
        raise ValueError(f"max_states={max_states} must be >= 1, max_points={max_points} >= 2")
    allowed = problem.allowed
    n, m = allowed.shape
    dist = np.where(allowed, problem.distortion, np.inf)
    cost = np.where(allowed, np.asarray(problem.costs[res], float), np.inf)
    base = cost.min(axis=1) if n else np.zeros(0)
    inc = np.where(allowed, cost - base[:, None], 0.0)
    if quantum is None:
        quantum, exact = choose_quantum(inc, max_states)
    else:
        if not (math.isfinite(quantum) and quantum > 0):
            raise ValueError(f"quantum={quantum} must be a positive number")
        exact = _integral(inc / quantum)
    scaled = inc / quantum
    near = np.rint(scaled)
    snap = np.abs(scaled - near) <= 1e-9 * np.maximum(1.0, near)  # float noise on a multiple
    q = np.where(inc > 0, np.maximum(np.where(snap, near, np.ceil(scaled)), 1.0), 0.0)
    dp_choices, states, blocks = _dp_plans(q.astype(np.int64), dist, max_table_bytes)
    t_dp = time.perf_counter() - t0
    hull = hull_path(cost, dist)
    hull_choices = hull.choices().astype(dp_choices.dtype, copy=False)
    choices = np.concatenate([dp_choices, hull_choices])
    proven = np.concatenate(
        [np.full(len(dp_choices), exact), np.ones(len(hull_choices), dtype=bool)]
    )
    idx = np.arange(n)
    plan_cost = cost[idx, choices].sum(axis=1) if n else np.zeros(len(choices))
    plan_dist = dist[idx, choices].sum(axis=1) if n else np.zeros(len(choices))
    # Cheapest first; among equal costs the least distortion, then a proven point.
    order = np.lexsort((~proven, plan_dist, plan_cost))
    plan_cost, plan_dist = plan_cost[order], plan_dist[order]
    best = np.concatenate(([np.inf], np.minimum.accumulate(plan_dist)[:-1]))
    keep = order[plan_dist < best]
    cost_k, dist_k = plan_cost[plan_dist < best], plan_dist[plan_dist < best]
    if len(keep) > max_points:
        grid = np.linspace(cost_k[0], cost_k[-1], max_points)
        sel = np.unique(np.searchsorted(cost_k, grid, side="right") - 1)
        keep, cost_k, dist_k = keep[sel], cost_k[sel], dist_k[sel]
    choices = choices[keep]
    return ParetoFrontier(
        resource=res,
        cost=cost_k,
        distortion=dist_k,
        choices=choices,
        costs={
            r: np.asarray(c, float)[idx, choices].sum(axis=1) if n else np.zeros(len(keep))
            for r, c in problem.costs.items()
        },
        optimal=proven[keep],
        quantum=float(quantum),
        states=states,
        exact=bool(exact),
        hull=hull,
        stats={
            "dp_blocks": blocks,
            "dp_candidates": len(dp_choices),
            "hull_points": len(hull_choices),
            "dp_time": t_dp,
            "wall_time": time.perf_counter() - t0,
        },
    )


def solve_pareto(
    problem: AllocationProblem,
    *,
    quantum: float | None = None,
    max_states: int = 4096,
) -> Solution:
    """The plan on the frontier for ``problem.limits`` (exactly one budgeted resource).

    Status ``optimal`` when the DP is exact (or the plan meets the LP bound), else ``feasible``
    with ``stats["gap_bound"]`` = (distortion - LP bound) / LP bound, a certified bound on how
    far it is from the optimum; ``infeasible`` (with ``min_feasible``) below the cheapest plan.
    """
    t0 = time.perf_counter()
    validate_problem(problem)
    if len(problem.limits) != 1:
        raise MpqError(
            f"pareto solves one budgeted resource, the problem budgets {sorted(problem.limits)};"
            f" use the ilp solver for several"
        )
    [(res, limit)] = problem.limits.items()
    if over_min(problem):
        return infeasible(problem, "pareto", time.perf_counter() - t0)
    front = pareto_frontier(problem, res, quantum=quantum, max_states=max_states)
    pt = front.pick(limit)
    if pt is None:  # cannot happen: the cheapest plan is the hull's first point
        raise RuntimeError("pareto: no frontier point within a feasible budget")
    bound = front.lower_bound(limit)
    gap = (pt.distortion - bound) / bound if bound > 0 else (0.0 if pt.distortion <= 0 else np.inf)
    gap = max(0.0, float(gap))
    stats = {
        "quantum": front.quantum,
        "states": front.states,
        "points": len(front),
        "exact": front.exact,
        "lower_bound": bound,
        "gap_bound": gap,
    }
    status = "optimal" if front.exact or gap <= 1e-12 else "feasible"
    return done(problem, pt.choice, status, "pareto", t0, stats)
