"""Headroom report: what any allocation could achieve on a problem, before a search is run.

- the smallest and largest amount of every resource a plan can use, and the amount beyond
  which no plan has less distortion ("no gain beyond": the cheapest least-distortion plan);
- the uniform points: cost and distortion of every option given to all decisions;
- a **lower bound on distortion** at a list of budgets of one resource: the LP relaxation of
  the allocation ILP (one-hot constraints relaxed to ``0 <= x <= 1``), solved with
  ``scipy.optimize.linprog`` (HiGHS). Budgets on other resources are dropped, which can only
  lower the bound, so it stays a bound;
- **what allocation could save at best**: for each uniform plan, the least budget whose LP bound
  reaches that plan's distortion. No plan with as little distortion is cheaper, so
  ``uniform cost - that budget`` is an upper bound on the savings of any allocation at equal
  predicted distortion. The single-resource LP's value is piecewise linear in the budget: the
  convex-hull path of the multiple-choice knapsack (Sinha & Zoltners 1979, see
  :func:`mpq.solvers.pareto.hull_path`), which is inverted exactly here.

The bound idea is HAWQ-V3's and Q-Palette's use of the ILP/LP optimum as the reference curve;
"before any search is run" is what the issue asks of ``mpq bounds``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mpq.solvers._common import RTOL, allowed_pairs
from mpq.solvers.base import AllocationProblem, validate_problem
from mpq.solvers.pareto import HullPath, hull_path, single_resource

Unit = Callable[[str, float], float]


@dataclass(frozen=True)
class UniformPoint:
    """Every decision at ``option``: its use of each resource, distortion, and whether it fits
    the problem's budgets."""

    option: str
    costs: dict[str, float]
    distortion: float
    within_budget: bool


@dataclass(frozen=True)
class Saving:
    """For one uniform plan: the least budget of the resource whose LP bound reaches its
    distortion, and the most any allocation could save against it (``saving``, ``fraction``
    of the uniform plan's cost)."""

    option: str
    uniform_cost: float
    uniform_distortion: float
    least_budget: float
    saving: float
    fraction: float


@dataclass(frozen=True)
class Headroom:
    resource: str
    smallest: dict[str, float]
    largest: dict[str, float]
    no_gain_beyond: dict[str, float]
    least_distortion: float
    uniform: list[UniformPoint]
    skipped: list[str]
    budgets: np.ndarray
    lower_bounds: np.ndarray
    savings: list[Saving]
    limits: dict[str, float]

    def to_markdown(self, unit: Unit | None = None, unit_name: str = "") -> str:
        """The report as Markdown; ``unit(resource, amount)`` converts amounts for display
        (e.g. stored bits to bits per weight), ``unit_name`` labels them."""

        def u(r: str, v: float) -> str:
            if not np.isfinite(v):
                return "-"
            return f"{unit(r, v) if unit else v:.6g}"

        r0 = self.resource
        label = f" ({unit_name})" if unit_name else ""
        lines = [f"## Headroom on `{r0}`{label}", ""]
        lines += [
            "| resource | smallest feasible | largest feasible | no gain beyond | budget |",
            "|---|---|---|---|---|",
        ]
        for r in self.smallest:
            lim = self.limits.get(r)
            lines.append(
                f"| {r} | {u(r, self.smallest[r])} | {u(r, self.largest[r])} "
                f"| {u(r, self.no_gain_beyond[r])} | {u(r, lim) if lim is not None else '-'} |"
            )
        lines += ["", f"Least distortion any plan reaches: {self.least_distortion:.6g}.", ""]
        lines += [
            "### Uniform plans",
            "",
            "| option | " + " | ".join(self.smallest) + " | distortion | within budget |",
            "|---|" + "---|" * (len(self.smallest) + 2),
        ]
        for p in self.uniform:
            cells = " | ".join(u(r, p.costs[r]) for r in self.smallest)
            lines.append(
                f"| {p.option} | {cells} | {p.distortion:.6g} "
                f"| {'yes' if p.within_budget else 'no'} |"
            )
        if self.skipped:
            lines += [
                "",
                f"Not a uniform plan (not allowed for some decision): {', '.join(self.skipped)}.",
            ]
        lines += [
            "",
            f"### Lower bound on distortion (LP relaxation, `{r0}` only)",
            "",
            f"| {r0} budget | distortion >= |",
            "|---|---|",
        ]
        for b, lb in zip(self.budgets, self.lower_bounds, strict=True):
            lines.append(f"| {u(r0, float(b))} | {'infeasible' if np.isinf(lb) else f'{lb:.6g}'} |")
        lines += [
            "",
            "### What allocation could save at best",
            "",
            f"| uniform | its {r0} | least {r0} reaching its distortion (LP) "
            f"| saving at most | share |",
            "|---|---|---|---|---|",
        ]
        for s in self.savings:
            share = f"{100 * s.fraction:.1f}%" if np.isfinite(s.fraction) else "-"
            saved = (
                u(r0, s.saving) if unit is None or not np.isfinite(s.saving) else _diff(unit, r0, s)
            )
            lines.append(
                f"| {s.option} | {u(r0, s.uniform_cost)} | {u(r0, s.least_budget)} "
                f"| {saved} | {share} |"
            )
        return "\n".join(lines) + "\n"


def _diff(unit: Unit, r: str, s: Saving) -> str:
    return f"{unit(r, s.uniform_cost) - unit(r, s.least_budget):.6g}"


def lp_lower_bounds(
    problem: AllocationProblem, resource: str, budgets: Sequence[float] | np.ndarray
) -> np.ndarray:
    """The LP relaxation's least distortion at each budget of ``resource`` (``inf`` where even
    the LP is infeasible), by ``scipy.optimize.linprog`` (HiGHS), one LP per budget."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_array

    dec, opt = allowed_pairs(problem)
    nv, n = len(dec), len(problem.decisions)
    a_eq = csr_array((np.ones(nv), (dec, np.arange(nv))), shape=(n, nv))
    row = np.asarray(problem.costs[resource], float)[dec, opt][None, :]
    c = np.asarray(problem.distortion, float)[dec, opt]
    out = np.empty(len(budgets))
    if nv == 0:  # no decisions: the empty plan, distortion 0, cost 0
        return np.where(np.asarray(budgets, float) >= 0, 0.0, np.inf)
    for i, b in enumerate(np.asarray(budgets, float)):
        res = linprog(
            c,
            A_ub=row,
            b_ub=[b * (1 + RTOL)],
            A_eq=a_eq,
            b_eq=np.ones(n),
            bounds=(0.0, 1.0),
            method="highs",
        )
        if res.status == 2:
            out[i] = np.inf
        elif res.status == 0:
            out[i] = float(res.fun)
        else:
            raise RuntimeError(f"linprog failed on the LP relaxation: {res.message}")
    return out


def least_budget_for(path: HullPath, distortion: float) -> float:
    """The least budget whose LP bound is at most ``distortion`` (inverting the hull path)."""
    floor = float(path.distortion[-1])
    if distortion < floor:
        if distortion < floor - 1e-9 * max(abs(floor), 1e-300):
            return float("inf")
        distortion = floor  # the same plan value summed in another order
    return float(np.interp(distortion, path.distortion[::-1], path.cost[::-1]))


def headroom(
    problem: AllocationProblem,
    resource: str | None = None,
    budgets: Sequence[float] | None = None,
) -> Headroom:
    """The headroom report of ``problem`` on ``resource`` (default: its only budgeted one).

    ``budgets`` (amounts of ``resource``) default to the uniform points, the problem's limit and
    nine evenly spaced amounts from the smallest feasible to "no gain beyond".
    """
    validate_problem(problem)
    res = single_resource(problem, resource)
    allowed = problem.allowed
    n = allowed.shape[0]
    dist = np.where(allowed, problem.distortion, np.inf)
    smallest, largest, no_gain = {}, {}, {}
    best = dist.min(axis=1) if n else np.zeros(0)
    for r, c in problem.costs.items():
        ca = np.where(allowed, np.asarray(c, float), np.nan)
        smallest[r] = float(np.nanmin(ca, axis=1).sum()) if n else 0.0
        largest[r] = float(np.nanmax(ca, axis=1).sum()) if n else 0.0
        at_best = np.where(dist == best[:, None], ca, np.nan)
        no_gain[r] = float(np.nanmin(at_best, axis=1).sum()) if n else 0.0
    uniform, skipped = [], []
    for o, name in enumerate(problem.options):
        choice = np.full(n, o)
        if not allowed[:, o].all():
            skipped.append(name)
            continue
        uniform.append(
            UniformPoint(
                name,
                problem.cost_of(choice),
                problem.distortion_of(choice),
                problem.feasible(choice),
            )
        )
    cost = np.where(allowed, np.asarray(problem.costs[res], float), np.inf)
    path = hull_path(cost, dist)
    if budgets is None:
        pts = [p.costs[res] for p in uniform]
        if res in problem.limits:
            pts.append(float(problem.limits[res]))
        pts += list(np.linspace(smallest[res], no_gain[res], 9))
        budgets = sorted(set(pts))
    b = np.asarray(budgets, float)
    lower = lp_lower_bounds(problem, res, b)
    savings = []
    for p in uniform:
        uc = p.costs[res]
        least = least_budget_for(path, p.distortion)
        if abs(uc - least) <= 1e-9 * max(abs(uc), 1e-300):
            least = uc  # float noise: no saving
        savings.append(
            Saving(
                p.option, uc, p.distortion, least, uc - least, (uc - least) / uc if uc > 0 else 0.0
            )
        )
    return Headroom(
        resource=res,
        smallest=smallest,
        largest=largest,
        no_gain_beyond=no_gain,
        least_distortion=float(best.sum()),
        uniform=uniform,
        skipped=skipped,
        budgets=b,
        lower_bounds=lower,
        savings=savings,
        limits={r: float(v) for r, v in problem.limits.items()},
    )
