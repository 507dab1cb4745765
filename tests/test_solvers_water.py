"""The water level of the LP relaxation (`mpq.solvers._water`) against scipy's LP and the
definition of a price: the vertex a decision takes at a price minimizes distortion + price x
cost over its allowed options; the LP value of the decisions left equals HiGHS's LP."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linprog

from mpq.solvers._water import WaterLevel
from mpq.testing import random_problem


def _lp(dist: np.ndarray, cost: np.ndarray, allowed: np.ndarray, budget: float) -> float:
    d, o = np.nonzero(allowed)
    n = dist.shape[0]
    a_eq = np.zeros((n, len(d)))
    a_eq[d, np.arange(len(d))] = 1.0
    res = linprog(dist[d, o], A_ub=cost[d, o][None, :], b_ub=[budget], A_eq=a_eq,
                  b_eq=np.ones(n), bounds=(0, 1), method="highs")
    return float(res.fun) if res.status == 0 else float("inf")


@pytest.mark.parametrize("seed", range(8))
def test_lp_value_and_vertices(seed: int) -> None:
    p = random_problem(seed, decisions=10, options=5, disallow=0.2)
    allowed = p.allowed
    dist = np.where(allowed, p.distortion, np.inf)
    cost = p.costs["bits"]
    water = WaterLevel(dist, cost, allowed)
    rng = np.random.default_rng(seed)
    lo = np.where(allowed, cost, np.inf).min(axis=1)
    hi = np.where(allowed, cost, -np.inf).max(axis=1)
    for t in (0, 3, 9):
        for frac in (-0.1, 0.0, 0.3, 0.7, 1.0, 1.2):
            budget = lo[t:].sum() + frac * (hi[t:].sum() - lo[t:].sum())
            level = water.level(t, budget)
            exact = _lp(dist[t:], cost[t:], allowed[t:], budget)
            if not np.isfinite(exact):
                assert level.price == np.inf and level.lp_value == np.inf
                continue
            assert level.lp_value == pytest.approx(exact, rel=1e-7, abs=1e-9), (t, frac)
            assert level.price >= 0
    for _ in range(50):
        price = float(10 ** rng.uniform(-4, 1))
        for d in range(10):
            o = water.vertex(d, price)
            scores = np.where(allowed[d], dist[d] + price * cost[d], np.inf)
            assert allowed[d, o] and scores[o] <= scores.min() * (1 + 1e-9) + 1e-12
