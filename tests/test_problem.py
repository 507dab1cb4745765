"""The problem builder on a real (tiny) model: decisions, exact costs, budget errors."""

from __future__ import annotations

import pytest
from conftest import tiny_llama

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.plan import uniform_plan
from mpq.problem import build_problem, parse_budget, solution_to_plan
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.greedy import solve_greedy
from mpq.targets import decisions
from mpq.testing.conformance import synthetic_setup

FORMATS = [QuantFormat.parse(s) for s in ("3", "4:asym", "8")]


def _setup():  # type: ignore[no-untyped-def]
    model = tiny_llama()
    targets, cost, table, formats = synthetic_setup(model)
    assert formats == FORMATS
    return model, targets, cost, table


def test_decisions_and_costs_match_cost_model() -> None:
    _, targets, cost, table = _setup()
    p = build_problem(cost, FORMATS, {"bits": 5.0}, table)
    groups = decisions(targets)
    assert p.decisions == tuple(groups)
    for o, fmt in enumerate(FORMATS):
        rep = cost.plan_cost(uniform_plan(targets, fmt, "tiny"))
        assert p.costs["bits"][:, o].sum() == rep.target_bits
        d = p.distortion[:, o].sum()
        assert d == pytest.approx(sum(table.distortion(t.name, fmt.spec()) for t in targets))


def test_solution_becomes_a_plan_within_budget() -> None:
    _, targets, cost, table = _setup()
    p = build_problem(cost, FORMATS, {"bits": 4.6}, table)
    plan = solution_to_plan(p, solve_greedy(p), cost, FORMATS)
    plan.validate(targets)  # ties respected
    assert cost.plan_cost(plan).effective_bits <= 4.6
    by_bytes = build_problem(cost, FORMATS, {"bytes": cost.plan_cost(plan).total_bytes}, table)
    plan2 = solution_to_plan(by_bytes, solve_greedy(by_bytes), cost, FORMATS)
    assert cost.plan_cost(plan2).total_bytes <= cost.plan_cost(plan).total_bytes


def test_infeasible_budget_names_the_smallest_achievable() -> None:
    _, targets, cost, table = _setup()
    least = cost.plan_cost(uniform_plan(targets, FORMATS[0], "tiny")).effective_bits
    with pytest.raises(MpqError, match=f"smallest achievable is bits={least:.6g}"):
        build_problem(cost, FORMATS, {"bits": 3.0}, table)
    build_problem(cost, FORMATS, {"bits": least}, table)  # exactly the least is feasible


def test_budget_above_full_precision_and_bad_strings() -> None:
    _, _, cost, table = _setup()
    with pytest.raises(MpqError, match="above full precision"):
        build_problem(cost, FORMATS, {"bits": 17.0}, table)
    with pytest.raises(MpqError, match="needs MACs"):
        build_problem(cost, FORMATS, {"bops": 1e9}, table)
    assert parse_budget("4.5") == {"bits": 4.5}
    assert parse_budget("bits=4, bytes=1e6") == {"bits": 4.0, "bytes": 1e6}
    for bad, msg in (("watts=3", "unknown resource"), ("bits=x", "not a number"), ("", "empty")):
        with pytest.raises(MpqError, match=msg):
            parse_budget(bad)


def test_nan_sensitivities_are_refused() -> None:
    with pytest.raises(MpqError, match="NaN"):
        SensitivityTable("x", "m", "d", distortions={"a": {"4": float("nan")}})
