"""BAQ's closed form: the fitted model, water-filling against cvxpy and the KKT conditions, the
lower bound when the model is exact, and the flags when it is not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpq.solvers.base import AllocationProblem
from mpq.solvers.closed_form import (
    equal_loss,
    fit_error_model,
    solve_closed_form,
    solve_relaxation,
    solve_relaxation_cvxpy,
    water_fill,
)
from mpq.testing import brute_force, random_problem


def _model_problem(seed: int, n: int = 6, frac: float | None = None) -> AllocationProblem:
    """Distortions exactly ``size * w * sigma^2 * 2^(-2 b)``, cost = size * bits."""
    rng = np.random.default_rng(seed)
    bits = np.array([2.0, 3.0, 4.0, 8.0])
    size = rng.integers(1, 10, n).astype(float)
    cost = size[:, None] * bits
    dist = rng.uniform(0.1, 10, n)[:, None] * size[:, None] * 2.0 ** (-2 * bits)
    frac = rng.uniform(0.05, 0.95) if frac is None else frac
    lo, hi = cost[:, 0].sum(), cost[:, -1].sum()
    return AllocationProblem(
        tuple(f"d{i}" for i in range(n)),
        ("2", "3", "4", "8"),
        dist,
        {"bits": cost},
        {"bits": float(lo + frac * (hi - lo))},
    )


def test_fit_recovers_bits_per_weight_and_the_constant() -> None:
    p = _model_problem(0)
    m = fit_error_model(p)
    assert m.exact and m.max_rel_residual < 1e-12
    assert np.allclose(m.bits, [2.0, 3.0, 4.0, 8.0])  # every decision
    size = p.costs["bits"][:, 0] / 2
    assert np.allclose(m.beta, 2 * math.log(2) * p.limits["bits"] / size)
    assert np.allclose(np.exp(m.alpha - m.beta * m.lo), p.distortion[:, 0])


@pytest.mark.parametrize("seed", range(3))
def test_water_filling_agrees_with_cvxpy(seed: int) -> None:
    p = _model_problem(seed, n=8)
    closed = solve_relaxation(p)
    check = solve_relaxation_cvxpy(p)
    assert closed.value == pytest.approx(check.value, rel=1e-4)
    assert np.allclose(closed.cost, check.cost, atol=1e-3 * closed.cost.max())


@pytest.mark.parametrize("seed", range(4))
def test_water_filling_meets_the_kkt_conditions(seed: int) -> None:
    m = fit_error_model(_model_problem(seed, n=10))
    r = water_fill(m)
    c = r.cost
    marginal = m.beta * np.exp(m.alpha - m.beta * c)  # distortion removed per unit of cost
    lam = math.exp(r.level)
    free = (c > m.lo + 1e-12) & (c < m.hi - 1e-12)
    assert np.allclose(marginal[free], lam, rtol=1e-9)
    assert np.all(marginal[c <= m.lo + 1e-12] <= lam * (1 + 1e-9))  # not worth a unit more
    assert np.all(marginal[c >= m.hi - 1e-12] >= lam * (1 - 1e-9))  # worth it, but capped
    assert c.sum() == pytest.approx(m.budget, rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_relaxation_bounds_the_integer_optimum_when_the_model_is_exact(seed: int) -> None:
    p = _model_problem(seed)
    best, _ = brute_force(p)
    sol = solve_closed_form(p)
    assert sol.stats["lower_bound"] is not None
    assert sol.stats["lower_bound"] <= best * (1 + 1e-9) <= sol.objective * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_equal_loss_per_weight_at_the_continuous_optimum(seed: int) -> None:
    """BAQ: every decision inside its bounds ends with the same loss per weight (beta * D);
    the clipped ones are counted, and the rounded plan's spread is reported, not hidden."""
    p = _model_problem(seed, n=8)
    m = fit_error_model(p)
    r = solve_relaxation(p)
    sol = solve_closed_form(p)
    eq = equal_loss(p, m, r, sol.choice)
    assert eq.interior + eq.at_lower + eq.at_upper == len(p.decisions)
    per_weight = m.beta * np.exp(m.alpha - m.beta * r.cost)
    free = (r.cost > m.lo + 1e-9) & (r.cost < m.hi - 1e-9)
    assert eq.interior == int(free.sum())
    if eq.interior >= 2:
        assert eq.spread_relaxed == pytest.approx(1.0, abs=1e-6)
        expect = per_weight[free].max() / per_weight[free].min()
        assert eq.spread_relaxed == pytest.approx(expect)
        plan = m.beta * p.distortion[np.arange(len(p.decisions)), sol.choice]
        assert eq.spread_plan == pytest.approx(plan[free].max() / plan[free].min())
        assert eq.spread_plan >= 1.0
    assert sol.stats["equal_loss_interior"] == eq.interior


def test_budget_above_every_option_gives_the_best_plan() -> None:
    p = _model_problem(1, frac=1.0)
    r = solve_relaxation(p)
    m = fit_error_model(p)
    assert np.allclose(r.cost, m.hi)
    sol = solve_closed_form(p)
    assert (sol.choice == 3).all()


def test_off_model_distortions_are_flagged_and_give_no_bound() -> None:
    p = random_problem(3, disallow=0.2)  # lognormal noise around the model
    sol = solve_closed_form(p)
    assert sol.stats["lower_bound"] is None and sol.stats["max_rel_residual"] > 1e-3
    # A zero-distortion option (keep 16-bit), a single usable option, and distortion rising
    # with cost: each is flagged and the plan still fits.
    dist = np.array([[4.0, 1.0, 0.0], [2.0, 3.0, 4.0], [5.0, np.inf, np.inf], [4.0, 2.0, 1.0]])
    cost = np.array([[2.0, 4.0, 16.0], [2.0, 4.0, 16.0], [2.0, 4.0, 16.0], [2.0, 4.0, 8.0]])
    q = AllocationProblem(
        ("k", "up", "one", "ok"), ("2", "4", "16"), dist, {"bits": cost}, {"bits": 30.0}
    )
    model = fit_error_model(q)
    assert not model.exact
    text = " ".join(model.flags)
    assert "k: zero-distortion" in text and "up: distortion does not fall" in text
    sol = solve_closed_form(q)
    assert sol.status == "feasible" and q.feasible(sol.choice)
    best, _ = brute_force(q)
    assert sol.objective >= best


def test_single_positive_option_borrows_a_slope() -> None:
    dist = np.array([[4.0, 1.0, 0.25], [3.0, 0.0, 0.0]])
    cost = np.array([[2.0, 4.0, 6.0], [2.0, 4.0, 6.0]])
    q = AllocationProblem(("a", "b"), ("2", "4", "6"), dist, {"bits": cost}, {"bits": 8.0})
    model = fit_error_model(q)
    assert any("b: too few options" in f for f in model.flags)
    # Decision "b" borrows beta * span from "a": the same model bits per unit of span.
    assert model.beta[1] == pytest.approx(model.beta[0])
    sol = solve_closed_form(q)
    assert q.feasible(sol.choice)


def test_below_the_cheapest_plan_is_infeasible() -> None:
    p = _model_problem(2)
    least = p.min_costs()["bits"]
    tight = AllocationProblem(p.decisions, p.options, p.distortion, p.costs, {"bits": least - 1})
    sol = solve_closed_form(tight)
    assert sol.status == "infeasible" and sol.min_feasible == {"bits": least}
    with pytest.raises(ValueError, match="below the cheapest plan"):
        water_fill(fit_error_model(tight))
