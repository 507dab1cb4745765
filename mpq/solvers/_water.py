"""The water level of the allocation's LP relaxation on the decisions still to place (numpy).

For one budgeted resource, each decision's options on the lower convex hull of (cost,
distortion), cheapest first, are the options the LP relaxation can pick; moving from hull
vertex ``i`` to ``i + 1`` buys ``ddist`` less distortion for ``dcost`` more cost, at the price
``ddist / dcost`` (decreasing along the hull). The LP optimum over decisions ``t..`` with a
budget left takes every decision's cheapest vertex and then the steps of highest price first
while they fit, the last one fractionally (Sinha & Zoltners 1979; :func:`mpq.solvers.pareto.
hull_path` builds the same path for the whole problem). :class:`WaterLevel` answers, for a step
``t`` and the budget left, that price (the *water level*), the vertex each decision takes at
any price, and the LP's value (a lower bound on the distortion of the decisions left).

**Rounding the lump** (``level(..., rounding=True)``): the LP buys one hull step only in part,
the *lump*. Its decision is later rounded down by the clamp when the decisions before it spent
the budget at the LP's price; when the lump is a large decision (a classifier or LM head: a
step at least :data:`LUMP_RATIO` times the median step of the others left), that rounding is
where an integer plan loses most (MobileNetV2 at 5 bits: the classifier left at 3 bits, 10.8%
above the ILP; BENCHMARKS.md, "Search policies"). The rounded level fixes the lump's decision
at the better of its two vertices around the step, each side valued by the LP of the other
decisions (one branch of branch and bound), and the others follow that side's price; the
decision is re-taken at every step, on the budget then left.

The SAC agent (:mod:`mpq.solvers.sac`) acts relative to this level: its action scales the
price for the decision at hand, and the LP value of what is left is the potential of its
reward shaping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# A lump worth rounding first: a hull step at least this many times the median step of the
# other decisions left (below it the steps left are of its size and absorb its rounding).
# Chosen on the tables of BENCHMARKS.md, MobileNetV2's included (4 misses its classifier).
LUMP_RATIO = 2.0


@dataclass(frozen=True)
class Level:
    """The water level for the decisions ``t..``: ``price`` (``inf``: not even the cheapest
    vertices fit; ``0``: every decision can take its least-distortion vertex), and the LP
    relaxation's value of those decisions at that budget (``inf`` when nothing fits).
    ``fixed_dec`` / ``fixed_vertex``: with rounding, the lump's decision and the vertex it is
    fixed at (-1: none), ``branch_value`` that side's LP value (``price`` is then its price).
    ``lump_dec``: the decision whose hull step the LP buys only in part (-1: none, when every
    step fits or nothing does), ``lump_cost`` that step's cost, ``lump_frac`` the part bought
    (in [0, 1)), and ``extra`` the budget left above the decisions' cheapest vertices. Rounding
    that step is where an integer plan loses against the LP."""

    price: float
    lp_value: float
    lump_dec: int = -1
    lump_cost: float = 0.0
    lump_frac: float = 0.0
    extra: float = 0.0
    fixed_dec: int = -1
    fixed_vertex: int = -1
    branch_value: float = float("nan")


class WaterLevel:
    """Hulls of one resource's costs; see the module docstring. ``allowed`` masks options."""

    def __init__(self, distortion: np.ndarray, cost: np.ndarray, allowed: np.ndarray) -> None:
        n = distortion.shape[0]
        self.vertices: list[np.ndarray] = []
        bp_dec, bp_price, bp_dcost, bp_ddist = [], [], [], []
        base_cost = np.zeros(n)
        base_dist = np.zeros(n)
        for d in range(n):
            opts = np.flatnonzero(allowed[d])
            order = opts[np.lexsort((distortion[d, opts], cost[d, opts]))]
            pareto: list[int] = []
            for o in order:  # cost ascending; keep strictly falling distortion
                if not pareto or distortion[d, o] < distortion[d, pareto[-1]]:
                    if pareto and cost[d, o] == cost[d, pareto[-1]]:
                        pareto[-1] = int(o)
                    else:
                        pareto.append(int(o))
            hull: list[int] = []
            for o in pareto:  # lower convex hull: prices must fall along it
                while len(hull) >= 2:
                    a, b = hull[-2], hull[-1]
                    p_ab = (distortion[d, a] - distortion[d, b]) / (cost[d, b] - cost[d, a])
                    p_bo = (distortion[d, b] - distortion[d, o]) / (cost[d, o] - cost[d, b])
                    if p_bo >= p_ab:
                        hull.pop()
                    else:
                        break
                hull.append(o)
            self.vertices.append(np.array(hull, dtype=np.int64))
            base_cost[d] = cost[d, hull[0]]
            base_dist[d] = distortion[d, hull[0]]
            for a, b in zip(hull[:-1], hull[1:], strict=True):
                dc = float(cost[d, b] - cost[d, a])
                dd = float(distortion[d, a] - distortion[d, b])
                bp_dec.append(d)
                bp_price.append(dd / dc)
                bp_dcost.append(dc)
                bp_ddist.append(dd)
        order = np.lexsort((np.array(bp_dec), -np.array(bp_price))) if bp_dec else np.zeros(0, int)
        self.dec = np.asarray(bp_dec, dtype=np.int64)[order]
        self.price = np.asarray(bp_price, dtype=float)[order]
        self.dcost = np.asarray(bp_dcost, dtype=float)[order]
        self.ddist = np.asarray(bp_ddist, dtype=float)[order]
        # Suffix sums over decisions t.. of the cheapest vertices (index n is 0).
        self.rest_cost = np.append(np.cumsum(base_cost[::-1])[::-1], 0.0)
        self.rest_dist = np.append(np.cumsum(base_dist[::-1])[::-1], 0.0)
        self.n = n
        self.prices_of = [self.price[self.dec == d] for d in range(n)]  # descending per decision

    def level(self, t: int, budget_left: float, rounding: bool = False) -> Level:
        """The water level of decisions ``t..`` when ``budget_left`` is left for them.
        ``rounding``: round the lump (see :meth:`_round_lump`)."""
        extra = budget_left - self.rest_cost[t]
        if extra < 0:
            return Level(float("inf"), float("inf"))
        mask = self.dec >= t
        price, lp_gain, k, frac = self._fill(mask, extra)
        lp = float(self.rest_dist[t] - lp_gain)
        if k < 0:
            return Level(0.0, lp, extra=float(extra))
        base = Level(price, lp, int(self.dec[k]), float(self.dcost[k]), float(frac), float(extra))
        return self._round_lump(t, mask, extra, k, base) if rounding else base

    def _fill(self, mask: np.ndarray, extra: float) -> tuple[float, float, int, float]:
        """The LP over the steps in ``mask`` with ``extra`` to spend: (price, distortion
        gained, the fractional step's index (-1: every step fits), the part of it bought)."""
        dcost = np.where(mask, self.dcost, 0.0)
        cs = np.cumsum(dcost)
        k = int(np.searchsorted(cs, extra, side="right"))
        while k < len(cs) and not mask[k]:  # a masked step of cost 0 is no lump
            k += 1
        gained = float(np.where(mask, self.ddist, 0.0)[:k].sum())
        if k >= len(cs):
            return 0.0, gained, -1, 0.0
        spent = float(cs[k - 1]) if k else 0.0
        frac = (extra - spent) / self.dcost[k]
        inside = np.flatnonzero(mask[:k])
        p_out = float(self.price[k])
        p_in = float(self.price[inside[-1]]) if len(inside) else 2.0 * p_out
        price = float(np.sqrt(p_in * p_out)) if p_in > 0 and p_out > 0 else p_out
        return price, gained + float(frac * self.ddist[k]), k, float(frac)

    def _round_lump(self, t: int, mask: np.ndarray, extra: float, k: int, base: Level) -> Level:
        """The lump's decision fixed at the better of its two vertices around the LP's
        fractional step (one branch of branch and bound, each side valued by the LP of the
        other decisions): the level is then that side's price for every other decision.
        When the lump is a large decision, the LP's price alone would leave it to be
        rounded down at the end, after the budget it needed went to the small ones."""
        lump = int(self.dec[k])
        own = self.dec == lump
        others = mask & ~own
        if LUMP_RATIO > 0 and others.any():
            if self.dcost[k] < LUMP_RATIO * float(np.median(self.dcost[others])):
                return base
        best: tuple[float, float, int] | None = None
        for up in (False, True):
            taken = own & (np.arange(len(self.dec)) < k + int(up))
            left = extra - float(self.dcost[taken].sum())
            if left < 0:
                continue
            price, gained, _, _ = self._fill(others, left)
            value = float(self.rest_dist[t] - self.ddist[taken].sum() - gained)
            if best is None or value < best[0]:
                best = (value, price, int(np.count_nonzero(taken)))
        if best is None:
            return base
        value, price, steps = best
        return replace(
            base,
            price=price,
            fixed_dec=lump,
            fixed_vertex=int(self.vertices[lump][steps]),
            branch_value=value,
        )

    def vertex(self, d: int, price: float) -> int:
        """The option decision ``d`` takes at ``price``: the hull vertex after every step of
        a higher price."""
        hull = self.vertices[d]
        steps = int(np.count_nonzero(self.prices_of[d] > price))
        return int(hull[min(steps, len(hull) - 1)])

    def price_of(self, d: int, lv: Level) -> float:
        """The price decision ``d`` answers to at level ``lv``: the level's, or for the
        decision it fixed (:meth:`_round_lump`) one between the prices of the hull steps
        into and out of the fixed vertex (so it takes that vertex)."""
        if lv.fixed_dec != d:
            return lv.price
        prices = self.prices_of[d]
        j = int(np.flatnonzero(self.vertices[d] == lv.fixed_vertex)[0])
        into = float(prices[j - 1]) if j > 0 else float("inf")
        out = float(prices[j]) if j < len(prices) else 0.0
        if math.isinf(into):
            return 2.0 * out if out > 0 else 1.0
        return into / 2.0 if out <= 0 else math.sqrt(into * out)

    def step_prices(self, d: int, price: float) -> tuple[float, float]:
        """The prices of decision ``d``'s hull steps around its vertex at ``price``: the step
        into it (``inf`` at the cheapest vertex) and the step out of it (0 at the dearest)."""
        prices = self.prices_of[d]
        steps = int(np.count_nonzero(prices > price))
        into = float(prices[steps - 1]) if steps > 0 else float("inf")
        out = float(prices[steps]) if steps < len(prices) else 0.0
        return into, out
