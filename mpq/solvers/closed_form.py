"""BAQ's convex allocation: continuous bits by reverse water-filling on an exponential error
model, then rounding to the candidate options with a repair step (BAQ, "Efficient Bit
Allocation Quantization for Large Language Models", Zhang et al. 2025; the water-filling form
is the classic rate-distortion allocation of Gersho & Gray, "Vector Quantization and Signal
Compression", 1992, ch. 8).

The model. BAQ writes the loss of layer ``i`` at ``b_i`` bits per weight as
``D_i(b) = n_i * w_i * sigma_i^2 * 2^(-2 b)`` (``w_i`` from the sensitivity, ``n_i`` weights,
``sigma_i^2`` their variance) and minimizes ``sum_i D_i(b_i)`` subject to
``sum_i n_i b_i <= B``, ``b_min <= b_i <= b_max``. Its KKT conditions give
``b_i = clip(c + 0.5 * log2(w_i sigma_i^2 / lambda'), b_min, b_max)`` with one water level
``lambda'`` found so that the budget is met: reverse water-filling.

From an `AllocationProblem`. A problem has options with measured distortions and costs, not
``(w, sigma)``, so the model is fitted per decision:

- cost. With one budget ``r``, a decision's cost ``c = costs[r][d, o] / limits[r]`` (with
  several, ``c = sum_r costs[r][d, o] / limits[r]`` and the budget is their number: every plan
  within all budgets meets that one, so the relaxation stays a relaxation). Stored bits are
  ``n * b`` plus scales, so ``c`` is affine in bits per weight.
- fit. ``ln D_i(b) = ln(n_i w_i sigma_i^2) - 2 ln2 * b`` is linear in ``c``:
  ``ln distortion[d, o] ~ alpha_d - beta_d * c[d, o]``, fitted by least squares over the
  decision's allowed options with positive distortion. ``beta_d = 2 ln2 / (n_d * u)`` (``u`` =
  cost units per stored bit) recovers the weights count, so ``c * beta_d / (2 ln 2)`` are the
  option's *model bits per weight* (:attr:`ErrorModel.bits`, offsets aside) and
  ``exp(alpha_d)`` the model constant ``n w sigma^2``. A decision with fewer than two usable
  options borrows ``beta`` from the others (median of ``beta * span``, divided by its span);
  a fitted ``beta <= 0`` (more bits never help) is clamped to a flat model. Both are flagged.
- bounds. ``b_min``/``b_max``: the decision's cheapest option and its least-distortion option.

Rounding (BAQ section 4): each decision takes the non-dominated option nearest to its
continuous cost; a repair step restores feasibility (downgrade adding the least distortion per
unit of budget excess removed), then leftover budget is spent greedily (upgrades removing the
most distortion per unit of cost). The continuous optimum is a **lower bound** on the integer
problem's distortion when the options' distortions follow the fitted model exactly
(``Relaxation.is_lower_bound``); otherwise it is only the model's estimate.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.solvers._common import done, fill_upgrades, over_min, repair_downgrades
from mpq.solvers.base import AllocationProblem, Solution, infeasible, validate_problem

LN2x2 = 2.0 * math.log(2.0)


@dataclass(frozen=True)
class ErrorModel:
    """Per decision: ``distortion(c) = exp(alpha - beta * c)`` on ``lo <= c <= hi`` (normalized
    cost ``c``, see the module docstring), the budget on ``sum c``, and the fit's quality."""

    alpha: np.ndarray
    beta: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    budget: float
    ncost: np.ndarray
    weights: Mapping[str, float]
    max_rel_residual: float
    flags: tuple[str, ...]

    @property
    def exact(self) -> bool:
        """The options' distortions follow the model (relative residual <= 1e-9, no flags)."""
        return self.max_rel_residual <= 1e-9 and not self.flags

    @property
    def bits(self) -> np.ndarray:
        """Model bits per weight of each (decision, option): ``c * beta / (2 ln 2)``."""
        return self.ncost * self.beta[:, None] / LN2x2

    def value(self, c: np.ndarray) -> float:
        live = np.isfinite(self.alpha)
        return float(np.exp(self.alpha[live] - self.beta[live] * c[live]).sum())


@dataclass(frozen=True)
class Relaxation:
    """The continuous optimum: cost per decision (normalized), its modelled distortion, the
    water level ``ln lambda``, and whether ``value`` bounds every integer plan from below."""

    cost: np.ndarray
    value: float
    level: float
    is_lower_bound: bool
    solver: str


def _weights(problem: AllocationProblem) -> dict[str, float]:
    out = {}
    for r, lim in problem.limits.items():
        c = np.asarray(problem.costs[r], float)[problem.allowed]
        out[r] = 1.0 / lim if lim > 0 else 1.0 / max(float(np.abs(c).max(initial=0.0)), 1.0)
    return out


def fit_error_model(problem: AllocationProblem) -> ErrorModel:
    """Fit ``ln distortion ~ alpha_d - beta_d * c`` per decision (see the module docstring)."""
    if not problem.limits:
        raise MpqError("closed_form needs a budget on at least one resource")
    allowed = problem.allowed
    n = len(problem.decisions)
    w = _weights(problem)
    ncost = sum(
        (np.asarray(problem.costs[r], float) * w[r] for r in problem.limits),
        np.zeros(allowed.shape),
    )
    ncost = np.where(allowed, ncost, np.nan)
    budget = float(sum(w[r] * lim for r, lim in problem.limits.items()))
    dist = np.where(allowed, problem.distortion, np.inf)
    lo = np.nanmin(ncost, axis=1) if n else np.zeros(0)
    hi = np.empty(n)
    alpha = np.full(n, -np.inf)
    beta = np.full(n, np.nan)
    flags: list[str] = []
    resid = 0.0
    borrow: list[int] = []
    for d in range(n):
        ok = np.flatnonzero(allowed[d])
        best = dist[d, ok].min()
        hi[d] = ncost[d, ok][dist[d, ok] == best].min()
        pos = ok[dist[d, ok] > 0]
        x, y = ncost[d, pos], np.log(dist[d, pos])
        if len(pos) < len(ok):
            flags.append(f"{problem.decisions[d]}: zero-distortion options are off the model")
        if len(pos) >= 2 and np.ptp(x) > 0:
            xm, ym = x.mean(), y.mean()
            slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
            if slope >= 0:
                flags.append(f"{problem.decisions[d]}: distortion does not fall with cost")
                beta[d] = 1e-9 / max(hi[d] - lo[d], np.nanmax(ncost[d]) - lo[d], 1e-300)
                alpha[d] = float(np.log(dist[d, pos]).mean() + beta[d] * xm)
            else:
                beta[d] = -slope
                alpha[d] = float(ym + beta[d] * xm)
            model = np.exp(alpha[d] - beta[d] * x)
            resid = max(resid, float(np.max(np.abs(model - dist[d, pos]) / dist[d, pos])))
        elif len(pos) >= 1:
            borrow.append(d)
        # else: every allowed option has zero distortion; the decision costs nothing (alpha=-inf)
    ref = [beta[d] * (hi[d] - lo[d]) for d in range(n) if np.isfinite(beta[d]) and hi[d] > lo[d]]
    scale = float(np.median(ref)) if ref else 1.0
    for d in borrow:
        pos = np.flatnonzero(allowed[d] & (dist[d] > 0))
        span = max(float(np.nanmax(ncost[d]) - lo[d]), 1e-300)
        beta[d] = scale / span
        alpha[d] = float(np.mean(np.log(dist[d, pos]) + beta[d] * ncost[d, pos]))
        flags.append(f"{problem.decisions[d]}: too few options to fit, slope borrowed")
    beta = np.where(np.isfinite(beta), beta, 1.0)
    hi = np.where(np.isfinite(alpha), hi, lo)
    return ErrorModel(alpha, beta, lo, hi, budget, ncost, w, resid, tuple(flags))


def water_fill(model: ErrorModel, budget: float | None = None) -> Relaxation:
    """Reverse water-filling: the exact minimizer of ``sum_d exp(alpha_d - beta_d c_d)`` s.t.
    ``sum_d c_d <= budget``, ``lo_d <= c_d <= hi_d``. Bisection on the water level
    ``mu = ln lambda`` (``c_d = clip((alpha_d + ln beta_d - mu) / beta_d, lo_d, hi_d)``), then
    the level solved in closed form on the final active set."""
    b = model.budget if budget is None else float(budget)
    live = np.isfinite(model.alpha) & (model.hi > model.lo)
    lo, hi = model.lo, model.hi
    if lo.sum() > b * (1 + 1e-12):
        raise ValueError(f"budget {b:g} is below the cheapest plan ({lo.sum():g})")
    cost = np.where(live, hi, lo)
    if cost.sum() <= b or not live.any():
        return Relaxation(cost, model.value(cost), -np.inf, model.exact, "water_fill")
    a, be = model.alpha[live], model.beta[live]
    lo_l, hi_l = lo[live], hi[live]
    free = b - lo[~live].sum()  # budget left for the live decisions
    peak = a + np.log(be)  # mu at which c would sit at 0 before clipping

    def spend(mu: float) -> np.ndarray:
        return np.clip((peak - mu) / be, lo_l, hi_l)

    m_lo = float((peak - be * hi_l).min()) - 1.0  # every live decision at hi
    m_hi = float((peak - be * lo_l).max()) + 1.0  # every live decision at lo
    for _ in range(200):
        mid = 0.5 * (m_lo + m_hi)
        if spend(mid).sum() > free:
            m_lo = mid
        else:
            m_hi = mid
        if m_hi - m_lo <= 1e-15 * max(1.0, abs(mid)):
            break
    mu = m_hi
    c = spend(mu)
    inner = (c > lo_l) & (c < hi_l)
    if inner.any():  # exact level on this active set
        fixed = c[~inner].sum()
        mu_x = float(((peak[inner] / be[inner]).sum() - (free - fixed)) / (1 / be[inner]).sum())
        c_x = c.copy()
        c_x[inner] = (peak[inner] - mu_x) / be[inner]
        if np.all((c_x[inner] >= lo_l[inner]) & (c_x[inner] <= hi_l[inner])):
            mu, c = mu_x, c_x
    cost = cost.copy()
    cost[live] = c
    return Relaxation(cost, model.value(cost), mu, model.exact, "water_fill")


@dataclass(frozen=True)
class EqualLoss:
    """BAQ's equal-loss structure. At the continuous optimum every decision strictly inside its
    bounds has the same marginal loss ``beta_d D_d = lambda``; with ``beta_d`` proportional to
    ``1 / n_d`` that is the same loss *per weight* for every such layer. ``spread_relaxed`` is
    the ratio of the largest to the smallest ``beta_d D_d`` over those decisions at the
    water-filling optimum (1.0 = exactly equal: a check on the solver), ``spread_plan`` the same
    with the rounded plan's own (table) distortions: how far the integer plan is from equal loss.
    ``interior`` / ``at_lower`` / ``at_upper`` count the decisions by where the optimum put them.
    """

    interior: int
    at_lower: int
    at_upper: int
    spread_relaxed: float
    spread_plan: float

    def stats(self) -> dict[str, float | int]:
        return {f"equal_loss_{k}": v for k, v in self.__dict__.items()}


def equal_loss(
    problem: AllocationProblem, model: ErrorModel, relax: Relaxation, choice: np.ndarray
) -> EqualLoss:
    """The equal-loss check of the relaxation ``relax`` and the integer ``choice``."""
    live = np.isfinite(model.alpha) & (model.hi > model.lo)
    tol = 1e-9 * np.maximum(1.0, np.abs(model.hi))
    lower = live & (relax.cost <= model.lo + tol)
    upper = live & (relax.cost >= model.hi - tol)
    inner = live & ~lower & ~upper
    relaxed = model.beta * np.exp(model.alpha - model.beta * relax.cost)
    idx = np.arange(len(problem.decisions))
    plan = model.beta * problem.distortion[idx, np.asarray(choice, dtype=np.int64)]

    def spread(x: np.ndarray) -> float:
        x = x[inner & (x > 0) & np.isfinite(x)]
        return float(x.max() / x.min()) if len(x) else float("nan")

    return EqualLoss(
        int(inner.sum()), int(lower.sum()), int(upper.sum()), spread(relaxed), spread(plan)
    )


def solve_relaxation(problem: AllocationProblem) -> Relaxation:
    """The continuous relaxation of ``problem`` under the fitted model, in closed form."""
    validate_problem(problem)
    return water_fill(fit_error_model(problem))


def solve_relaxation_cvxpy(problem: AllocationProblem, solver: str | None = None) -> Relaxation:
    """The same continuous relaxation solved by cvxpy (an exponential-cone program; Clarabel by
    default): a check on :func:`water_fill`. Variables are rescaled to ``[0, 1]`` and the
    objective to about 1 for the solver's tolerances."""
    validate_problem(problem)
    cp: Any = importlib.import_module("cvxpy")
    model = fit_error_model(problem)
    live = np.isfinite(model.alpha) & (model.hi > model.lo)
    lo, hi = model.lo, model.hi
    cost = np.where(live, hi, lo).astype(float)
    if not live.any() or cost.sum() <= model.budget:
        return Relaxation(cost, model.value(cost), -np.inf, model.exact, "cvxpy")
    span = (hi - lo)[live]
    free = model.budget - lo.sum()
    k = model.beta[live] * span
    a0 = model.alpha[live] - model.beta[live] * lo[live]
    guess = np.clip(free / span.sum(), 0.0, 1.0)
    shift = float(np.logaddexp.reduce(a0 - k * guess))
    u = cp.Variable(int(live.sum()))
    objective = cp.Minimize(cp.sum(cp.exp((a0 - shift) - cp.multiply(k, u))))
    cons = [u >= 0, u <= 1, (span / free) @ u <= 1]
    prob = cp.Problem(objective, cons)
    prob.solve(solver=solver or "CLARABEL")
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"cvxpy could not solve the relaxation: {prob.status}")
    cost[live] = lo[live] + span * np.clip(np.asarray(u.value, float), 0.0, 1.0)
    return Relaxation(cost, model.value(cost), float("nan"), model.exact, "cvxpy")


def round_to_options(problem: AllocationProblem, model: ErrorModel, cost: np.ndarray) -> np.ndarray:
    """Per decision, the non-dominated allowed option whose normalized cost is nearest to
    ``cost[d]`` (ties: the cheaper)."""
    n, m = problem.distortion.shape
    dist = np.where(problem.allowed, problem.distortion, np.inf)
    choice = np.zeros(n, dtype=np.int64)
    for d in range(n):
        ok = np.flatnonzero(problem.allowed[d])
        c, v = model.ncost[d, ok], dist[d, ok]
        no_worse = (c[None, :] <= c[:, None]) & (v[None, :] <= v[:, None])
        better = (c[None, :] < c[:, None]) | (v[None, :] < v[:, None])
        dominated = (no_worse & better).any(axis=1)
        cand = ok[~dominated]
        gap = np.abs(model.ncost[d, cand] - cost[d])
        order = np.lexsort((model.ncost[d, cand], gap))
        choice[d] = cand[order[0]]
    return choice


def solve_closed_form(problem: AllocationProblem) -> Solution:
    """BAQ's allocation: water-filling on the fitted model, rounding, repair, greedy fill.

    Status ``feasible`` (a heuristic); ``infeasible`` (with ``min_feasible``) when a budget is
    below the cheapest plan, or, with several budgets, when the repair finds no plan within all
    of them (``stats["reason"]`` says so: the ilp solver decides such cases exactly).
    ``stats``: the relaxation's value, ``lower_bound`` (that value when the model is exact,
    else ``None``), the water level, the fit's largest relative residual and flags, and the
    number of repair and fill moves, and BAQ's equal-loss check (:class:`EqualLoss`, as
    ``equal_loss_*``).
    """
    t0 = time.perf_counter()
    validate_problem(problem)
    if not problem.limits:
        raise MpqError("closed_form needs a budget on at least one resource")
    if over_min(problem):
        return infeasible(problem, "closed_form", time.perf_counter() - t0)
    model = fit_error_model(problem)
    relax = water_fill(model)
    choice = round_to_options(problem, model, relax.cost)
    choice, repairs, ok = repair_downgrades(problem, choice)
    stats: dict[str, Any] = {
        "relaxation": relax.value,
        "lower_bound": relax.value if relax.is_lower_bound else None,
        "level": relax.level,
        "max_rel_residual": model.max_rel_residual,
        "flags": list(model.flags[:10]),
        "repairs": repairs,
    }
    if not ok:
        sol = infeasible(problem, "closed_form", time.perf_counter() - t0)
        stats["reason"] = "the repair found no plan within every budget; use the ilp solver"
        return replace(sol, stats=stats)
    choice, fills = fill_upgrades(problem, choice, model.weights)
    stats["fills"] = fills
    stats.update(equal_loss(problem, model, relax, choice).stats())
    return done(problem, choice, "feasible", "closed_form", t0, stats)
