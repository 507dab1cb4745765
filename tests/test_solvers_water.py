"""The water level of the LP relaxation (`mpq.solvers._water`) against scipy's LP and the
definition of a price: the vertex a decision takes at a price minimizes distortion + price x
cost over its allowed options; the LP value of the decisions left equals HiGHS's LP; the
rounded level fixes its lump at the vertex where HiGHS's LP with that decision fixed is least."""

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
    res = linprog(
        dist[d, o],
        A_ub=cost[d, o][None, :],
        b_ub=[budget],
        A_eq=a_eq,
        b_eq=np.ones(n),
        bounds=(0, 1),
        method="highs",
    )
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


@pytest.mark.parametrize("seed", range(6))
def test_rounded_level_fixes_the_lump_at_its_best_vertex(seed: int) -> None:
    """Oracle: scipy's LP with the lump's decision fixed at each of its hull vertices. The
    rounded level fixes it where that LP is least (the LP value is convex along a decision's
    hull, so the best vertex is one of the two around the partly bought step), reports that
    value, and leaves the plain LP value as it was."""
    p = random_problem(seed, decisions=10, options=5, disallow=0.2)
    allowed = p.allowed
    dist = np.where(allowed, p.distortion, np.inf).copy()
    cost = p.costs["bits"].astype(float).copy()
    dist[7] *= 12.0  # one decision far larger than the rest: a lump worth rounding
    cost[7] *= 12.0
    water = WaterLevel(dist, cost, allowed)
    lo = np.where(allowed, cost, np.inf).min(axis=1)
    hi = np.where(allowed, cost, -np.inf).max(axis=1)
    fixed = 0
    for t in (0, 4):
        for frac in np.linspace(0.05, 0.95, 10):
            budget = lo[t:].sum() + frac * (hi[t:].sum() - lo[t:].sum())
            plain = water.level(t, budget)
            rounded = water.level(t, budget, rounding=True)
            assert rounded.lp_value == plain.lp_value
            if rounded.fixed_dec < 0:
                continue
            fixed += 1
            L = rounded.fixed_dec
            assert L == plain.lump_dec
            values = {}
            for v in water.vertices[L]:
                only = allowed.copy()
                only[L] = False
                only[L, v] = True
                values[int(v)] = _lp(dist[t:], cost[t:], only[t:], budget)
            assert rounded.branch_value == pytest.approx(min(values.values()), rel=1e-7)
            assert values[rounded.fixed_vertex] == pytest.approx(rounded.branch_value, rel=1e-7)
            assert rounded.branch_value >= plain.lp_value * (1 - 1e-9)
    assert fixed >= 5
