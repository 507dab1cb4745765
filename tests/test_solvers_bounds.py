"""The headroom report: LP bounds against brute force and the exact hull, the savings bound,
the extreme budgets, and the Markdown."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpq.solvers.base import AllocationProblem
from mpq.solvers.bounds import headroom, lp_lower_bounds
from mpq.solvers.pareto import hull_path
from mpq.testing import random_problem


def _plans(p: AllocationProblem, r: str = "bits") -> tuple[np.ndarray, np.ndarray]:
    n, m = p.distortion.shape
    plans = np.array(list(itertools.product(range(m), repeat=n)))
    idx = np.arange(n)
    return p.costs[r][idx, plans].sum(1), p.distortion[idx, plans].sum(1)


@pytest.mark.parametrize("seed", range(5))
def test_lp_bound_is_below_the_optimum_and_matches_the_hull(seed: int) -> None:
    p = random_problem(seed, disallow=0.2)
    cost, dist = _plans(p)
    budgets = np.linspace(cost.min() - 5, cost[np.isfinite(dist)].max(), 15)
    lp = lp_lower_bounds(p, "bits", budgets)
    hull = hull_path(np.where(p.allowed, p.costs["bits"], np.inf), p.distortion)
    assert np.allclose(lp, hull.lower_bound(budgets), rtol=1e-7)
    for b, lb in zip(budgets, lp, strict=True):
        fits = cost <= b * (1 + 1e-12)
        if not fits.any():
            assert np.isinf(lb)
        else:
            assert lb <= dist[fits].min() * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_savings_bound_no_plan_beats_it(seed: int) -> None:
    p = random_problem(seed)
    h = headroom(p)
    cost, dist = _plans(p)
    assert len(h.savings) == len(h.uniform) == len(p.options)
    for s in h.savings:
        assert s.least_budget <= s.uniform_cost * (1 + 1e-12) and s.saving >= -1e-9
        # No plan cheaper than the least budget reaches the uniform plan's distortion.
        cheaper = cost < s.least_budget * (1 - 1e-9)
        assert not (dist[cheaper] <= s.uniform_distortion * (1 - 1e-12)).any()
        lb = lp_lower_bounds(p, "bits", [s.least_budget])[0]
        assert lb == pytest.approx(s.uniform_distortion, rel=1e-7)


def test_extremes_uniform_points_and_markdown() -> None:
    dist = np.array([[4.0, 1.0, 0.5], [2.0, np.inf, 0.1]])
    bits = np.array([[2.0, 4.0, 8.0], [4.0, 8.0, 16.0]])
    bops = 10 * bits
    p = AllocationProblem(
        ("a", "b"), ("2", "4", "8"), dist, {"bits": bits, "bops": bops}, {"bits": 14.0}
    )
    h = headroom(p)
    assert h.resource == "bits"
    assert h.smallest == {"bits": 6.0, "bops": 60.0}
    assert h.largest == {"bits": 24.0, "bops": 240.0}
    assert h.no_gain_beyond == {"bits": 24.0, "bops": 240.0}
    assert h.least_distortion == pytest.approx(0.6)
    assert [u.option for u in h.uniform] == ["2", "8"] and h.skipped == ["4"]
    assert h.uniform[0].within_budget and not h.uniform[1].within_budget
    assert 14.0 in h.budgets
    md = h.to_markdown()
    for part in (
        "## Headroom on `bits`",
        "### Uniform plans",
        "Lower bound on distortion",
        "What allocation could save at best",
        "Not a uniform plan",
        "| 2 |",
    ):
        assert part in md
    md = h.to_markdown(unit=lambda r, v: v / 2, unit_name="bits per weight")
    assert "(bits per weight)" in md and "| bits | 3 | 12 | 12 | 7 |" in md


def test_other_budgets_are_dropped_and_resource_is_named() -> None:
    p = random_problem(2, resources=3)
    with pytest.raises(ValueError, match="one resource"):
        headroom(p)
    h = headroom(p, "bops", budgets=[p.limits["bops"]])
    assert h.resource == "bops" and len(h.lower_bounds) == 1
