"""The Pareto frontier: every point against brute force, the discretization, the hull path and
its LP bound, the low-memory traceback, and picks that never exceed their budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpq.solvers.base import AllocationProblem
from mpq.solvers.pareto import choose_quantum, hull_path, pareto_frontier, solve_pareto
from mpq.testing import random_problem


def _all_plans(p: AllocationProblem, resource: str = "bits") -> tuple[np.ndarray, np.ndarray]:
    n, m = p.distortion.shape
    plans = np.array(list(itertools.product(range(m), repeat=n)))
    idx = np.arange(n)
    return p.costs[resource][idx, plans].sum(1), p.distortion[idx, plans].sum(1)


def _float_problem(seed: int, n: int = 6, m: int = 4) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    cost = np.sort(rng.uniform(0.5, 10.0, (n, m)), axis=1)
    dist = np.sort(rng.uniform(0.01, 5.0, (n, m)), axis=1)[:, ::-1].copy()
    lo, hi = cost[:, 0].sum(), cost[:, -1].sum()
    return AllocationProblem(
        tuple(f"d{i}" for i in range(n)),
        tuple(f"o{j}" for j in range(m)),
        dist,
        {"bits": cost},
        {"bits": float(lo + rng.uniform(0.1, 0.9) * (hi - lo))},
    )


@pytest.mark.parametrize("seed", range(6))
def test_every_point_is_optimal_for_its_cost(seed: int) -> None:
    p = random_problem(seed, disallow=0.2)
    f = pareto_frontier(p)
    assert f.exact and f.optimal.all()
    cost, dist = _all_plans(p)
    assert np.all(np.diff(f.cost) > 0) and np.all(np.diff(f.distortion) < 0)
    for i in range(len(f)):
        assert f.distortion[i] == pytest.approx(dist[cost <= f.cost[i]].min(), rel=1e-12)
        assert f.costs["bits"][i] == f.cost[i] == p.cost_of(f.choices[i])["bits"]
    # ... and nothing is missing: every brute-force frontier cost is a point.
    order = np.lexsort((dist, cost))
    c, d = cost[order], dist[order]
    front = c[d < np.concatenate(([np.inf], np.minimum.accumulate(d)[:-1]))]
    assert np.array_equal(np.unique(front), f.cost)


def test_pick() -> None:
    p = random_problem(2)
    f = pareto_frontier(p)
    assert f.pick(f.cost[0] - 1) is None
    mid = 0.5 * (f.cost[2] + f.cost[3])
    pt = f.pick(mid)
    assert pt is not None and pt.index == 2 and pt.cost <= mid
    assert f.pick(f.cost[3]).index == 3  # type: ignore[union-attr]
    assert f.pick(1e18).index == len(f) - 1  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", range(3))
def test_blocked_traceback_equals_the_full_table(seed: int) -> None:
    p = random_problem(seed, decisions=9, options=5, disallow=0.2)
    full = pareto_frontier(p)
    low = pareto_frontier(p, max_table_bytes=1)  # one decision per block
    assert low.stats["dp_blocks"] == 9 and full.stats["dp_blocks"] == 1
    assert np.array_equal(full.choices, low.choices)
    assert np.array_equal(full.cost, low.cost)


def test_quantum() -> None:
    bits = np.array([[0.0, 64.0, 128.0], [0.0, 32.0, 96.0]])
    assert choose_quantum(bits, 4096) == (32.0, True)
    assert choose_quantum(bits / 8, 4096) == (4.0, True)  # bytes
    q, exact = choose_quantum(bits, 4)  # span 224 / 32 = 7 states > 4
    assert not exact and q == 64.0  # a multiple of the gcd
    q, exact = choose_quantum(np.array([[0.0, np.pi]]), 100)
    assert not exact and q == pytest.approx(np.pi / 100)


@pytest.mark.parametrize("seed", range(6))
def test_rounded_costs_keep_budgets_and_certify_the_gap(seed: int) -> None:
    p = _float_problem(seed)
    cost, dist = _all_plans(p)
    f = pareto_frontier(p, max_states=16)
    assert not f.exact
    for b in np.linspace(f.cost[0], f.cost[-1] * 1.01, 25):
        pt = f.pick(b)
        assert pt is not None and p.cost_of(pt.choice)["bits"] <= b * (1 + 1e-12)
        best = dist[cost <= b].min()
        assert f.lower_bound(b) <= best * (1 + 1e-12)  # the LP bound is a bound
        assert pt.distortion >= best * (1 - 1e-12)
    sol = solve_pareto(p, max_states=16)
    best = dist[cost <= p.limits["bits"]].min()
    assert sol.status in ("feasible", "optimal") and p.feasible(sol.choice)
    lb = sol.stats["lower_bound"]
    assert lb <= best * (1 + 1e-12)
    assert sol.objective <= lb * (1 + sol.stats["gap_bound"]) * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_hull_points_are_optimal_for_their_cost(seed: int) -> None:
    p = _float_problem(seed)
    cost, dist = _all_plans(p)
    h = hull_path(p.costs["bits"], p.distortion)
    plans = h.choices()
    assert np.all(np.diff(h.cost) > 0) and np.all(np.diff(h.distortion) < 0)
    for i, c in enumerate(h.cost):
        assert p.cost_of(plans[i])["bits"] == pytest.approx(c)
        assert h.distortion[i] == pytest.approx(dist[cost <= c * (1 + 1e-12)].min(), rel=1e-9)
    assert np.isinf(h.lower_bound(h.cost[0] - 1.0)[0])


def test_many_points_are_thinned() -> None:
    p = random_problem(4, decisions=40, options=6)
    f = pareto_frontier(p, max_points=50)
    assert len(f) <= 50 and np.all(np.diff(f.cost) > 0)
    assert f.cost[0] == p.min_costs()["bits"]
    for b in np.linspace(f.cost[0], f.cost[-1], 30):
        pt = f.pick(b)
        assert pt is not None and p.cost_of(pt.choice)["bits"] <= b


def test_frontier_over_a_named_resource_ignores_other_budgets() -> None:
    p = random_problem(5, resources=3)
    with pytest.raises(ValueError, match="one resource"):
        pareto_frontier(p)
    with pytest.raises(ValueError, match="pareto solves one budgeted resource"):
        solve_pareto(p)
    with pytest.raises(ValueError, match="no cost table"):
        pareto_frontier(p, "watts")
    f = pareto_frontier(p, "latency")
    assert f.resource == "latency" and np.all(np.diff(f.costs["latency"]) > 0)


def test_infeasible_and_trivial() -> None:
    p = random_problem(1)
    least = p.min_costs()["bits"]
    tight = AllocationProblem(p.decisions, p.options, p.distortion, p.costs, {"bits": least - 1})
    sol = solve_pareto(tight)
    assert sol.status == "infeasible" and sol.min_feasible == {"bits": least}
    one = AllocationProblem(
        ("a",), ("x",), np.array([[1.0]]), {"bits": np.array([[4.0]])}, {"bits": 4.0}
    )
    assert solve_pareto(one).choice.tolist() == [0]
