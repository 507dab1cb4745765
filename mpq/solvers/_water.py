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

The SAC agent (:mod:`mpq.solvers.sac`) acts relative to this level: its action scales the
price for the decision at hand, and the LP value of what is left is the potential of its
reward shaping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Level:
    """The water level for the decisions ``t..``: ``price`` (``inf``: not even the cheapest
    vertices fit; ``0``: every decision can take its least-distortion vertex), and the LP
    relaxation's value of those decisions at that budget (``inf`` when nothing fits).
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

    def level(self, t: int, budget_left: float) -> Level:
        """The water level of decisions ``t..`` when ``budget_left`` is left for them."""
        extra = budget_left - self.rest_cost[t]
        if extra < 0:
            return Level(float("inf"), float("inf"))
        mask = self.dec >= t
        dcost = np.where(mask, self.dcost, 0.0)
        cs = np.cumsum(dcost)
        k = int(np.searchsorted(cs, extra, side="right"))
        gained = float(np.where(mask, self.ddist, 0.0)[:k].sum())
        if k >= len(cs):
            return Level(0.0, float(self.rest_dist[t] - gained), extra=float(extra))
        spent = float(cs[k - 1]) if k else 0.0
        frac = (extra - spent) / self.dcost[k]
        lp = float(self.rest_dist[t] - gained - frac * self.ddist[k])
        inside = np.flatnonzero(mask[:k])
        p_out = float(self.price[k])
        p_in = float(self.price[inside[-1]]) if len(inside) else 2.0 * p_out
        price = float(np.sqrt(p_in * p_out)) if p_in > 0 and p_out > 0 else p_out
        return Level(price, lp, int(self.dec[k]), float(self.dcost[k]), float(frac), float(extra))

    def vertex(self, d: int, price: float) -> int:
        """The option decision ``d`` takes at ``price``: the hull vertex after every step of
        a higher price."""
        hull = self.vertices[d]
        steps = int(np.count_nonzero(self.prices_of[d] > price))
        return int(hull[min(steps, len(hull) - 1)])

    def step_prices(self, d: int, price: float) -> tuple[float, float]:
        """The prices of decision ``d``'s hull steps around its vertex at ``price``: the step
        into it (``inf`` at the cheapest vertex) and the step out of it (0 at the dearest)."""
        prices = self.prices_of[d]
        steps = int(np.count_nonzero(prices > price))
        into = float(prices[steps - 1]) if steps > 0 else float("inf")
        out = float(prices[steps]) if steps < len(prices) else 0.0
        return into, out
