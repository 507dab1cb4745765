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


def _full_curve_guard(p: AllocationProblem, sol, measure):  # type: ignore[no-untyped-def]
    """The guard's numbers from the whole uniform curve (every uniform plan measured)."""
    from mpq.solvers.measure import uniform_choices

    curve = uniform_curve(p, measure)
    fitting = {p.options[int(c[0])] for c in uniform_choices(p)}
    limit = p.limits["bits"]
    below = [pt for pt in curve if pt.option in fitting]
    above = [pt for pt in curve if pt.option not in fitting and pt.use > limit]
    m = measure(np.asarray(sol.choice))
    return (below[-1].option if below else None, above[0].option if above else None,
            equal_quality_use(curve, m))  # fmt: skip


@pytest.mark.parametrize("seed", range(16))
def test_guard_unseen_measures_only_the_uniform_plans_its_answer_needs(seed: int) -> None:
    """Lazy curve == whole curve (neighbours, bits at equal quality, verdict) on random
    problems whose options tie in use, while the plans dearer than the first one above the
    budget that is as good as the mixed plan are never measured."""
    rng = np.random.default_rng(seed)
    n, k = 5, 7
    width = np.sort(rng.choice([3.0, 3.5, 4.0, 4.0, 4.5, 5.0, 6.0, 8.0], size=k, replace=False))
    width[rng.integers(1, k)] = width[rng.integers(0, k)]  # a tie in use, sometimes
    dist = rng.uniform(0.1, 1, (n, k)) / width  # noisy: the measure disagrees with the table
    p = AllocationProblem(
        tuple(f"d{i}" for i in range(n)), tuple(f"o{j}" for j in range(k)), dist,
        {"bits": np.tile(width, (n, 1))}, {"bits": float(rng.uniform(width[1], width[-2])) * n},
    )  # fmt: skip
    noise = rng.uniform(0.8, 1.25, k)
    mixing = rng.uniform(0.5, 1.1)  # mixed plans measure this much better (or worse)
    measured: list[tuple[int, ...]] = []

    def unseen(choice: np.ndarray) -> float:
        measured.append(tuple(choice.tolist()))
        gain = mixing if len(set(choice.tolist())) > 1 else 1.0
        return float(np.mean(noise[choice] / width[choice])) * gain

    mixed = solve_ilp(p)
    want_below, want_above, want_equal = _full_curve_guard(p, mixed, unseen)
    measured.clear()
    sol, _ = guard_unseen(p, mixed, unseen)
    assert sol.stats.get("uniform_below") == want_below
    assert sol.stats.get("uniform_above") == want_above
    got = sol.stats["equal_use"]
    assert (math.isnan(got) and math.isnan(want_equal)) or got == pytest.approx(want_equal)
    m = unseen(np.asarray(mixed.choice))
    uniforms = {c for c in measured if len(set(c)) == 1}
    limit = p.limits["bits"]
    # every measured uniform plan above the budget but the last is worse than the mixed plan,
    # and only plans of the last one's use come after it
    above = sorted((n * width[c[0]], unseen(np.asarray(c)), c) for c in uniforms
                   if n * width[c[0]] > limit)  # fmt: skip
    if above:
        first_good = next((u for u, v, _ in above if v <= m), None)
        if first_good is not None:
            assert all(u <= first_good for u, _, _ in above)
    skipped = [j for j in range(k) if (j,) * n not in uniforms]
    if sol.stats.get("uniform_above") is not None and skipped:
        assert all(width[j] * n > limit for j in skipped)
