"""The guard on unseen tokens: the uniform curve, bits at equal quality, the replacement rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpq.solvers.base import AllocationProblem
from mpq.solvers.guard import (
    UniformPoint,
    envelope,
    equal_quality_use,
    guard_unseen,
    uniform_curve,
)
from mpq.solvers.ilp import solve_ilp

# 4 decisions of 1 weight each (bits = the option's width), options 3 / 4 / 5 bits.
OPTIONS = ("3", "4", "5")
WIDTH = np.array([3.0, 4.0, 5.0])


def _problem(limit_bits: float) -> AllocationProblem:
    n = 4
    dist = np.array([[4.0, 2.0, 1.0], [8.0, 4.0, 2.0], [2.0, 1.0, 0.5], [1.0, 0.5, 0.25]])
    costs = {"bits": np.tile(WIDTH, (n, 1))}
    return AllocationProblem(tuple("abcd"), OPTIONS, dist, costs, {"bits": limit_bits * n})


def test_equal_quality_use_interpolates_between_the_bracketing_points() -> None:
    pts = [UniformPoint("3", 3.0, 2.0), UniformPoint("4", 4.0, 1.0), UniformPoint("5", 5.0, 0.5)]
    assert equal_quality_use(pts, 1.5) == pytest.approx(3.5)
    assert equal_quality_use(pts, 0.75) == pytest.approx(4.5)
    assert equal_quality_use(pts, 1.0) == pytest.approx(4.0)
    assert equal_quality_use(list(reversed(pts)), 0.6) == pytest.approx(4.8)
    assert math.isnan(equal_quality_use(pts, 3.0))  # worse than the cheapest uniform plan
    assert math.isnan(equal_quality_use(pts, 0.1))  # better than the dearest


def test_equal_quality_use_follows_the_envelope_not_a_dominated_point() -> None:
    # "5" costs more than "4a" and is worse: no uniform user reaches a quality through it, so
    # the curve goes 3 -> 4a -> 6 (a naive walk would bracket 0.7 between 5 and 6: 5.6)
    pts = [
        UniformPoint("3", 3.0, 2.0),
        UniformPoint("4a", 4.5, 0.8),
        UniformPoint("5", 5.0, 1.2),
        UniformPoint("6", 6.0, 0.6),
    ]
    assert [p.option for p in envelope(pts)] == ["3", "4a", "6"]
    assert equal_quality_use(pts, 0.7) == pytest.approx(4.5 + 1.5 * 0.5)
    assert equal_quality_use(pts, 1.4) == pytest.approx(3.0 + 1.5 * 0.5)
    assert equal_quality_use(pts, 2.0) == pytest.approx(3.0)
    assert math.isnan(equal_quality_use(pts, 0.5))
    # equal values: the cheaper point is the curve
    assert equal_quality_use([UniformPoint("a", 1.0, 1.0), UniformPoint("b", 2.0, 1.0)], 1.0) == 1.0


def test_guard_unseen_reports_both_neighbours_and_the_bits_at_equal_quality() -> None:
    p = _problem(3.5)
    mixed = solve_ilp(p)

    def unseen(choice: np.ndarray) -> float:  # a measure the table does not know: 1 / mean bits
        return float(1.0 / WIDTH[choice].mean())

    sol, why = guard_unseen(p, mixed, unseen)
    assert sol.stats["guard"] == "kept" and "unseen" in why
    assert sol.stats["uniform_below"] == "3" and sol.stats["uniform_above"] == "4"
    assert sol.stats["measured_below"] == pytest.approx(1 / 3)
    assert sol.stats["measured_above"] == pytest.approx(1 / 4)
    used = sol.stats["mixed_use"]
    assert used <= 3.5 * 4
    m = unseen(np.asarray(mixed.choice))
    # Linear in the value between 3 and 4 bits: the oracle by hand.
    expect = 12.0 + 4.0 * (1 / 3 - m) / (1 / 3 - 1 / 4)
    assert sol.stats["equal_use"] == pytest.approx(expect)
    assert [pt.option for pt in uniform_curve(p, unseen)] == list(OPTIONS)


def test_guard_unseen_replaces_a_mixed_plan_that_is_worse_on_unseen_tokens() -> None:
    p = _problem(4.25)
    mixed = solve_ilp(p)
    assert len(set(mixed.choice.tolist())) > 1

    def hates_mixing(choice: np.ndarray) -> float:
        return float(1.0 / WIDTH[choice].mean()) + (1.0 if len(set(choice.tolist())) > 1 else 0)

    sol, why = guard_unseen(p, mixed, hates_mixing)
    assert sol.stats["guard"] == "replaced" and sol.solver == "uniform"
    assert sol.stats["option"] == "4" and p.feasible(sol.choice)
    assert math.isnan(sol.stats["equal_use"])  # the mixed plan is off the uniform curve
    assert "uniform 4" in why
