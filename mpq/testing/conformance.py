"""The conformance suite every solver passes (in the style of optuna's ``BasicSamplerTestCase``).

Describe a solver with a :class:`SolverSpec` and subclass :class:`SolverConformance` in a test
module; pytest collects the ``test_*`` methods::

    class TestMySolver(SolverConformance):
        spec = SolverSpec("mine", solve_mine, exact=True)

Checks, on seeded random problems (integer costs, like stored bits; convex-ish distortions with
noise; some options not allowed): the budget is never exceeded on any resource (one and three
budgeted resources); an infeasible budget is reported as such with ``min_feasible`` equal to
the per-resource sum of the least costs (exact for one resource: that amount is feasible); the
same input gives the same plan; disallowed options are never chosen; the problem is not
modified; exact solvers equal brute force over every plan of 6 decisions x 4 options;
heuristics stay within their stated ratio of it. :func:`check_tie_groups` checks that a
problem built from a real model's targets gives a plan whose tie members share a format.

The module needs numpy only (torch only inside :func:`check_tie_groups`); assertions carry
their own messages, so no pytest assertion rewriting is needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mpq.solvers.base import STATUSES, AllocationProblem, Solution

if TYPE_CHECKING:
    from mpq.cost import CostModel
    from mpq.formats import QuantFormat
    from mpq.sensitivity.table import SensitivityTable
    from mpq.targets import Target

Solve = Callable[[AllocationProblem], Solution]
RESOURCES = ("bits", "bops", "latency")
BITS = np.array([2.0, 3.0, 4.0, 5.0, 6.0, 8.0])


@dataclass(frozen=True)
class SolverSpec:
    """What a solver promises.

    ``exact``: equals the brute-force optimum (status ``optimal``). ``max_ratio``: a heuristic's
    objective is at most ``max_ratio`` x the optimum on the suite's problems (``None``: quality
    is not checked, e.g. uniform). ``multi_resource``: accepts several budgets. ``complete``:
    returns a plan whenever one exists (uniform does not: it only tries uniform plans).
    """

    name: str
    solve: Solve
    exact: bool = False
    max_ratio: float | None = None
    multi_resource: bool = True
    complete: bool = True


def random_problem(
    seed: int,
    decisions: int = 6,
    options: int = 4,
    resources: int = 1,
    frac: float | None = None,
    disallow: float = 0.0,
    noise: float = 0.3,
) -> AllocationProblem:
    """A seeded random problem with integer costs and at least one feasible plan.

    Options are bit widths (sorted, from 2..8); ``bits`` = size x (bits + 1 for scales);
    ``bops`` = size x an integer per-decision MAC factor x bits; ``latency`` = integers that
    grow with bits but not in proportion. Distortion = sensitivity x size x 4^-bits x
    lognormal noise. ``disallow``: share of options marked not allowed (each decision keeps
    at least one). Limits: ``frac`` (random by default) of the way from a random plan's cost
    (the least cost, for one resource) to the largest.
    """
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.choice(BITS, size=options, replace=False))
    size = rng.integers(1, 10, decisions).astype(float)
    costs = {"bits": size[:, None] * (bits[None, :] + 1.0)}
    if resources >= 2:
        costs["bops"] = (size * rng.integers(1, 6, decisions))[:, None] * bits[None, :]
    if resources >= 3:
        step = rng.integers(1, 4, (decisions, options)).cumsum(axis=1)
        costs["latency"] = (rng.integers(2, 8, decisions)[:, None] + step).astype(float)
    sens = rng.uniform(0.1, 10.0, decisions)
    dist = sens[:, None] * size[:, None] * 4.0 ** (-bits[None, :])
    if noise:
        dist = dist * np.exp(rng.normal(0.0, noise, dist.shape))
    if disallow:
        off = rng.uniform(size=dist.shape) < disallow
        keep = rng.integers(0, options, decisions)
        off[np.arange(decisions), keep] = False
        dist = np.where(off, np.inf, dist)
    allowed = np.isfinite(dist)
    frac = float(rng.uniform(0.0, 1.0)) if frac is None else frac
    if resources == 1:
        ref = np.where(allowed, costs["bits"], np.inf).argmin(axis=1)
    else:
        ref = np.array([rng.choice(np.flatnonzero(row)) for row in allowed])
    idx = np.arange(decisions)
    limits = {}
    for r, c in costs.items():
        top = np.where(allowed, c, -np.inf).max(axis=1).sum()
        base = c[idx, ref].sum()
        limits[r] = float(np.floor(base + frac * (top - base)))
    return AllocationProblem(
        decisions=tuple(f"d{i}" for i in range(decisions)),
        options=tuple(f"{int(b)}" for b in bits),
        distortion=dist,
        costs=costs,
        limits=limits,
        meta={"seed": seed},
    )


def with_limits(problem: AllocationProblem, limits: dict[str, float]) -> AllocationProblem:
    return AllocationProblem(
        problem.decisions,
        problem.options,
        problem.distortion,
        problem.costs,
        limits,
        problem.meta,
    )


def brute_force(problem: AllocationProblem) -> tuple[float, np.ndarray | None]:
    """The least distortion over every plan within the budgets, and one such plan (``inf``,
    ``None`` when none is). Uses the same tolerance as :meth:`AllocationProblem.feasible`."""
    n, m = problem.distortion.shape
    plans = np.array(list(itertools.product(range(m), repeat=n)), dtype=np.int64).reshape(-1, n)
    idx = np.arange(n)
    dist = problem.distortion[idx, plans].sum(axis=1)
    ok = np.isfinite(dist)
    for r, lim in problem.limits.items():
        ok &= problem.costs[r][idx, plans].sum(axis=1) <= lim * (1 + 1e-12)
    if not ok.any():
        return float("inf"), None
    i = int(np.argmin(np.where(ok, dist, np.inf)))
    return float(dist[i]), plans[i]


def check_solution(problem: AllocationProblem, sol: Solution, spec: SolverSpec) -> None:
    """A returned plan is well formed, allowed, within every budget, and its reported
    objective and costs are the plan's."""
    where = f"{spec.name} on seed {problem.meta.get('seed')}"
    assert sol.status in STATUSES, f"{where}: status {sol.status!r}"
    if sol.status == "infeasible":
        assert sol.min_feasible is not None, f"{where}: infeasible without min_feasible"
        return
    choice = np.asarray(sol.choice)
    assert choice.shape == (len(problem.decisions),), f"{where}: choice shape {choice.shape}"
    assert ((choice >= 0) & (choice < len(problem.options))).all(), f"{where}: {choice}"
    allowed = problem.allowed[np.arange(len(choice)), choice]
    assert allowed.all(), f"{where}: chose a disallowed option {choice} ({allowed})"
    used = problem.cost_of(choice)
    for r, lim in problem.limits.items():
        assert used[r] <= lim * (1 + 1e-12), f"{where}: {r} {used[r]} over budget {lim}"
    assert np.isclose(sol.objective, problem.distortion_of(choice), rtol=1e-9, atol=0), (
        f"{where}: objective {sol.objective} is not the plan's {problem.distortion_of(choice)}"
    )
    for r, v in used.items():
        assert np.isclose(sol.costs[r], v, rtol=1e-9), f"{where}: cost {r} {sol.costs[r]} != {v}"


class SolverConformance:
    """Subclass with ``spec = SolverSpec(...)`` (and optionally fewer ``seeds``)."""

    spec: ClassVar[SolverSpec]
    seeds: ClassVar[Sequence[int]] = range(8)

    def _skip(self, why: str) -> None:
        import pytest

        pytest.skip(f"{self.spec.name}: {why}")

    def _solve(self, problem: AllocationProblem) -> Solution:
        sol = self.spec.solve(problem)
        check_solution(problem, sol, self.spec)
        return sol

    def _budgets(self, resources: int) -> None:
        for seed in self.seeds:
            p = random_problem(seed, resources=resources, disallow=0.15)
            sol = self._solve(p)
            if self.spec.complete:
                assert sol.status != "infeasible", (
                    f"{self.spec.name} seed {seed}: infeasible, but a plan fits (limits "
                    f"{dict(p.limits)})"
                )

    def test_budget_never_exceeded_one_resource(self) -> None:
        self._budgets(1)

    def test_budget_never_exceeded_three_resources(self) -> None:
        if not self.spec.multi_resource:
            self._skip("one budgeted resource only")
        self._budgets(3)

    def test_infeasible_reports_the_smallest_budget(self) -> None:
        for seed in self.seeds:
            p = random_problem(seed, disallow=0.15)
            least = p.min_costs()["bits"]
            sol = self._solve(with_limits(p, {"bits": least - 0.5}))
            assert sol.status == "infeasible", f"{self.spec.name} seed {seed}: {sol.status}"
            assert sol.min_feasible is not None
            assert np.isclose(sol.min_feasible["bits"], least, rtol=1e-12), (
                f"{self.spec.name} seed {seed}: min_feasible {sol.min_feasible} != {least}"
            )
            if self.spec.complete:
                at = self._solve(with_limits(p, {"bits": least}))
                assert at.status != "infeasible", (
                    f"{self.spec.name} seed {seed}: the least budget {least} itself is feasible"
                )

    def test_infeasible_with_several_budgets(self) -> None:
        if not self.spec.multi_resource:
            self._skip("one budgeted resource only")
        for seed in self.seeds:
            p = random_problem(seed, resources=3, disallow=0.15)
            mins = p.min_costs()
            tight = dict(p.limits)
            tight["bops"] = mins["bops"] - 0.5
            sol = self._solve(with_limits(p, tight))
            assert sol.status == "infeasible", f"{self.spec.name} seed {seed}: {sol.status}"
            assert sol.min_feasible is not None
            for r in p.limits:
                assert np.isclose(sol.min_feasible[r], mins[r], rtol=1e-12), (
                    f"{self.spec.name} seed {seed}: min_feasible {sol.min_feasible} != {mins}"
                )

    def test_deterministic(self) -> None:
        for seed in self.seeds:
            for resources in (1, 3) if self.spec.multi_resource else (1,):
                p = random_problem(seed, resources=resources, disallow=0.15)
                a = self._solve(p)
                b = self._solve(random_problem(seed, resources=resources, disallow=0.15))
                assert a.status == b.status, f"{self.spec.name} seed {seed}"
                assert np.array_equal(a.choice, b.choice), (
                    f"{self.spec.name} seed {seed}: {a.choice} then {b.choice}"
                )
                assert a.objective == b.objective or (
                    np.isinf(a.objective) and np.isinf(b.objective)
                ), f"{self.spec.name} seed {seed}: objective {a.objective} then {b.objective}"

    def test_disallowed_never_chosen(self) -> None:
        for seed in self.seeds:
            p = random_problem(seed, frac=0.5, disallow=0.4)
            # The otherwise best option of every decision is not allowed.
            dist = p.distortion.copy()
            finite = np.where(np.isfinite(dist), dist, np.inf)
            best = finite.argmin(axis=1)
            rows = np.flatnonzero(np.isfinite(dist).sum(axis=1) > 1)
            dist[rows, best[rows]] = np.inf
            q = AllocationProblem(p.decisions, p.options, dist, p.costs, p.limits, p.meta)
            self._solve(q)  # check_solution refuses a disallowed choice

    def test_problem_not_modified(self) -> None:
        p = random_problem(self.seeds[0], resources=3 if self.spec.multi_resource else 1)
        before = (p.distortion.copy(), {r: c.copy() for r, c in p.costs.items()}, dict(p.limits))
        self._solve(p)
        assert np.array_equal(p.distortion, before[0])
        assert all(np.array_equal(p.costs[r], before[1][r]) for r in p.costs)
        assert dict(p.limits) == before[2]

    def _against_brute_force(self, resources: int) -> list[float]:
        ratios = []
        for seed in self.seeds:
            p = random_problem(seed, resources=resources, disallow=0.15)
            best, _ = brute_force(p)
            sol = self._solve(p)
            assert np.isfinite(best)
            assert sol.status != "infeasible", f"{self.spec.name} seed {seed}: infeasible"
            assert sol.objective >= best * (1 - 1e-9), (
                f"{self.spec.name} seed {seed}: {sol.objective} below the optimum {best}"
            )
            if self.spec.exact:
                assert sol.status == "optimal", f"{self.spec.name} seed {seed}: {sol.status}"
                assert np.isclose(sol.objective, best, rtol=1e-9, atol=0), (
                    f"{self.spec.name} seed {seed}: {sol.objective} != optimum {best}"
                )
            ratios.append(sol.objective / best if best > 0 else 1.0)
        return ratios

    def test_optimal_or_within_stated_ratio(self) -> None:
        if not self.spec.exact and self.spec.max_ratio is None:
            self._skip("no optimality claim")
        for resources in (1, 3) if self.spec.multi_resource else (1,):
            ratios = self._against_brute_force(resources)
            if self.spec.max_ratio is not None:
                worst = max(ratios)
                assert worst <= self.spec.max_ratio, (
                    f"{self.spec.name}: {worst:.4f} x the optimum on {resources} resource(s), "
                    f"stated {self.spec.max_ratio}"
                )


def measure_ratios(solve: Solve, seeds: Sequence[int], resources: int = 1, **kw: Any) -> np.ndarray:
    """Objective / brute-force optimum on the suite's problems (``inf`` where the solver found
    no plan): how the stated ratios of heuristics were measured."""
    out = []
    for seed in seeds:
        p = random_problem(seed, resources=resources, **kw)
        best, _ = brute_force(p)
        sol = solve(p)
        out.append(np.inf if sol.status == "infeasible" else sol.objective / best)
    return np.array(out)


def synthetic_setup(
    model: Any, specs: Sequence[str] = ("3", "4:asym", "8"), seed: int = 0
) -> tuple[list[Target], CostModel, SensitivityTable, list[QuantFormat]]:
    """``(targets, cost model, table, formats)`` of a real (tiny) model with a synthetic
    table: every target's distortion at ``b`` bits is ``U(0, 1) * 4^-b`` (embeddings
    excluded; tie rules on; model id ``"tiny"``)."""
    from mpq.cost import build_cost_model
    from mpq.formats import QuantFormat
    from mpq.sensitivity.table import SensitivityTable
    from mpq.targets import discover

    formats = [QuantFormat.parse(s) for s in specs]
    targets = discover(model, exclude=["embed"])
    cost = build_cost_model(model, targets, "tiny")
    rng = np.random.default_rng(seed)
    table = SensitivityTable(
        "synthetic",
        "tiny",
        "none",
        distortions={
            t.name: {f.spec(): float(rng.uniform()) * 4.0**-f.bits for f in formats}
            for t in targets
        },
    )
    return targets, cost, table, formats


def check_tie_groups(solve: Solve, model: Any, name: str = "solver") -> None:
    """Build a problem from ``model``'s targets (tie rules on) with a synthetic table, solve it
    at a few budgets, and check each plan keeps every tie group at one format."""
    from mpq.plan import uniform_plan
    from mpq.problem import build_problem, solution_to_plan

    targets, cost, table, formats = synthetic_setup(model)
    ties = {t.tie for t in targets if t.tie is not None}
    assert ties, "the model has no tie groups to check"
    lo = cost.plan_cost(uniform_plan(targets, formats[0], "tiny")).effective_bits
    hi = cost.plan_cost(uniform_plan(targets, formats[-1], "tiny")).effective_bits
    for frac in (0.2, 0.5, 0.8):
        budget = lo + frac * (hi - lo)
        problem = build_problem(cost, formats, {"bits": budget}, table)
        sol = solve(problem)
        assert sol.status != "infeasible", f"{name}: infeasible at bits={budget}"
        plan = solution_to_plan(problem, sol, cost, formats)
        plan.validate(targets)
        for key in ties:
            specs = {plan.formats[t.name].spec() for t in targets if t.tie == key}
            assert len(specs) == 1, f"{name}: tie group {key} split over {specs}"
        assert cost.plan_cost(plan).effective_bits <= budget * (1 + 1e-12)
