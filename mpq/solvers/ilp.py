"""Exact allocation as an integer linear program: the multiple-choice knapsack with several
resource constraints (HAWQ-V3, Yao et al. 2021; NVIDIA ModelOpt's auto-quantize search;
MixDQ, Zhao et al. 2024; Q-Palette, Lee et al. 2025).

One binary ``x[d, o]`` per allowed (decision, option); disallowed options (distortion ``inf``)
have no variable, i.e. they are fixed at 0::

    minimize    sum_{d,o} distortion[d, o] * x[d, o]
    subject to  sum_o x[d, o] = 1                                 for every decision d
                sum_{d,o} costs[r][d, o] * x[d, o] <= limits[r]   for every budgeted r
                x[d, o] in {0, 1}

Backends: ``"highs"`` (``scipy.optimize.milp``, the default) and ``"cbc"`` (PuLP's bundled
CBC). Both are imported lazily, so ``import mpq.solvers`` stays numpy-only. Before either
runs, the model is reduced exactly (:mod:`mpq.solvers._reduce`: dominated options dropped, then
reduced-cost fixing against the LP's Lagrangian bound, solved on a small core of options that
grows until its optimum is provably the full problem's; the LP is HiGHS's for both backends).
On 1000 decisions x 8 options x 3 budgets this takes the HiGHS solve from 2.4 s to a fraction
of a second (BENCHMARKS.md, "Solvers at scale").

The plan returned is rounded from the solver's ``x`` (largest entry per decision) and its
costs are recomputed exactly; should the solver's feasibility tolerance (about 1e-6 absolute)
let the rounded plan go over a limit, the model is solved again with that limit lowered by
twice the excess (``stats["repairs"]``) and the status is downgraded to ``feasible``: a budget
is never exceeded.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from mpq.errors import MpqError
from mpq.solvers._common import RTOL, done, excess, over_min
from mpq.solvers._reduce import core_delta, dominated, lagrange_bound
from mpq.solvers.base import AllocationProblem, Solution, infeasible, validate_problem

Backend = Literal["highs", "cbc"]


@dataclass(frozen=True)
class _Milp:
    """The model a backend solves: variable ``i`` is one option of decision ``dec[i]``
    (``0 .. n_dec - 1``); minimize ``obj @ x`` with exactly one variable per decision at 1 and
    ``coef @ x <= limit`` for each ``rows[resource] = (coef, limit)``."""

    obj: np.ndarray
    dec: np.ndarray
    n_dec: int
    rows: Mapping[str, tuple[np.ndarray, float]]


class _Result:
    """What a backend found: ``status`` in optimal | time_limit | infeasible | no_solution."""

    def __init__(self, status: str, x: np.ndarray | None, stats: dict[str, Any]) -> None:
        self.status = status
        self.x = x
        self.stats = stats


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 while HiGHS runs: HiGHS 1.12 (bundled with SciPy 1.17) prints
    a stray debug line (``HighsMipSolverData::transformNewIntegerFeasibleSolution``) to stdout
    even with ``disp=False`` (ERGO-Code/HiGHS#2783)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        fd = 1
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def _highs(model: _Milp, time_limit: float | None, mip_gap: float) -> _Result:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    obj, dec, n_dec, rows = model.obj, model.dec, model.n_dec, model.rows
    nv = len(obj)
    one_hot = csr_array((np.ones(nv), (dec, np.arange(nv))), shape=(n_dec, nv))
    cons = [LinearConstraint(one_hot, 1.0, 1.0)]
    if rows:
        a = np.vstack([c for c, _ in rows.values()])
        ub = np.array([lim for _, lim in rows.values()])
        cons.append(LinearConstraint(a, -np.inf, ub))
    options: dict[str, Any] = {"disp": False, "mip_rel_gap": float(mip_gap), "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    with _quiet_stdout():
        res = milp(
            obj,
            integrality=np.ones(nv),
            bounds=Bounds(0.0, 1.0),
            constraints=cons,
            options=options,
        )
    stats: dict[str, Any] = {
        "backend": "highs",
        "message": str(res.message),
        "nodes": getattr(res, "mip_node_count", None),
        "gap": getattr(res, "mip_gap", None),
        "dual_bound": getattr(res, "mip_dual_bound", None),
    }
    x = None if res.x is None else np.asarray(res.x)
    if res.status == 0:
        return _Result("optimal", x, stats)
    if res.status == 1:
        return _Result("time_limit" if x is not None else "no_solution", x, stats)
    if res.status == 2:
        return _Result("infeasible", None, stats)
    raise RuntimeError(f"HiGHS failed on the allocation ILP: {res.message}")


def _cbc(model: _Milp, time_limit: float | None, mip_gap: float) -> _Result:
    # PuLP ships no type information; typed as Any rather than with an ignore comment.
    pulp: Any = importlib.import_module("pulp")

    obj, dec, n_dec, rows = model.obj, model.dec, model.n_dec, model.rows

    prob = pulp.LpProblem("mpq_allocation", pulp.LpMinimize)
    xs = [prob.add_variable(f"x{i}", 0, 1, cat=pulp.LpBinary) for i in range(len(obj))]
    prob += pulp.LpAffineExpression(list(zip(xs, obj.tolist(), strict=True)))
    members: list[list[Any]] = [[] for _ in range(n_dec)]
    for i, d in enumerate(dec.tolist()):
        members[d].append(xs[i])
    for d, vs in enumerate(members):
        prob += pulp.LpAffineExpression([(v, 1.0) for v in vs]) == 1, f"one_{d}"
    for k, (coef, lim) in enumerate(rows.values()):
        prob += pulp.LpAffineExpression(list(zip(xs, coef.tolist(), strict=True))) <= lim, f"r{k}"
    with warnings.catch_warnings():
        # PuLP 3.3 deprecates its bundled CBC (PULP_CBC_CMD) for PuLP 4, which will not ship
        # one; mpq pins pulp<4 and uses the bundled binary.
        warnings.simplefilter("ignore", DeprecationWarning)
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=mip_gap, threads=1)
        prob.solve(cmd)
    stats: dict[str, Any] = {
        "backend": "cbc",
        "message": pulp.LpSolution.get(prob.sol_status, str(prob.sol_status)),
        "nodes": None,  # the CBC command line does not report them through PuLP
        "gap": None,
    }
    sol = prob.sol_status
    if sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        x = np.array([v.value() or 0.0 for v in xs])
        if sol == pulp.LpSolutionOptimal:
            stats["gap"] = 0.0 if mip_gap == 0 else None
            return _Result("optimal", x, stats)
        return _Result("time_limit", x, stats)
    if sol == pulp.LpSolutionInfeasible or prob.status == pulp.LpStatusInfeasible:
        return _Result("infeasible", None, stats)
    if sol == pulp.LpSolutionNoSolutionFound:
        return _Result("no_solution", None, stats)
    raise RuntimeError(f"CBC failed on the allocation ILP: {stats['message']}")


def _solve_model(
    problem: AllocationProblem,
    limits: Mapping[str, float],
    backend: Backend,
    time_limit: float | None,
    mip_gap: float,
    objective: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> tuple[_Result, np.ndarray, np.ndarray]:
    """The ILP over the allowed options (only those in ``keep`` when given). Decisions left
    with one option are fixed before the backend sees the model (their costs come off the
    limits); ``x`` is returned over every (decision, option) pair of ``dec, opt``."""
    allowed = problem.allowed if keep is None else problem.allowed & keep
    d, o = np.nonzero(allowed)
    dec, opt = d.astype(np.int64), o.astype(np.int64)
    if backend not in ("highs", "cbc"):
        raise ValueError(f"ILP backend {backend!r} is unknown; use 'highs' or 'cbc'")
    fixed = (allowed.sum(axis=1) == 1)[dec] if keep is not None else np.zeros(len(dec), bool)
    free = ~fixed
    full_obj = problem.distortion if objective is None else objective
    obj = np.asarray(full_obj[dec[free], opt[free]], float)
    rows = {}
    for r, lim in limits.items():
        c = np.asarray(problem.costs[r], float)[dec, opt]
        rows[r] = (c[free], float(lim) - float(c[fixed].sum()))
    renum = np.cumsum(np.bincount(dec[free], minlength=len(problem.decisions)) > 0) - 1
    n_free = int(renum[-1]) + 1 if len(renum) else 0
    sub_dec = renum[dec[free]]
    if n_free == 0:
        fits = all(lim >= -abs(limits[r]) * RTOL for r, (_, lim) in rows.items())
        res = _Result(
            "optimal" if fits else "infeasible",
            np.ones(len(dec)) if fits else None,
            {"backend": backend, "nodes": 0, "gap": 0.0},
        )
        return res, dec, opt
    # Both backends also stop at an absolute gap (HiGHS 1e-6), which is no gap at all on
    # tables whose distortions are 1e-9..1e-2 (single-layer KLs): the objective goes to them
    # in units of its geometric mean, so the absolute gap is negligible next to the optimum.
    unit = _objective_unit(obj)
    model = _Milp(obj / unit, sub_dec, n_free, rows)
    res = (_highs if backend == "highs" else _cbc)(model, time_limit, mip_gap)
    if res.stats.get("dual_bound") is not None:
        res.stats["dual_bound"] = float(res.stats["dual_bound"]) * unit
    if res.x is not None:
        x = np.ones(len(dec))
        x[free] = res.x
        res.x = x
    return res, dec, opt


def _objective_unit(obj: np.ndarray) -> float:
    """The geometric mean of the positive objective coefficients (1 when there are none)."""
    pos = obj[np.isfinite(obj) & (obj > 0)]
    return float(np.exp(np.log(pos).mean())) if len(pos) else 1.0


def _solve_reduced(
    problem: AllocationProblem,
    limits: Mapping[str, float],
    backend: Backend,
    time_limit: float | None,
    mip_gap: float,
) -> tuple[_Result, np.ndarray, np.ndarray]:
    """The ILP solved on a core of options (see :mod:`mpq.solvers._reduce`): dominated
    options dropped, then the options whose reduced cost is at most ``delta``, with ``delta``
    raised until the core's optimum ``U`` proves itself (``U - L <= delta``). The result is
    the full problem's (same status, a plan of the same objective); ``stats["reduction"]``
    says what was kept."""
    t0 = time.perf_counter()
    resources = tuple(limits)
    keep = problem.allowed & ~dominated(problem, resources)
    info: dict[str, Any] = {"dominated": int(problem.allowed.sum() - keep.sum())}
    bound = lagrange_bound(problem, limits, keep)
    if bound is None:  # LP infeasible or failed: the full model reports why
        res, dec, opt = _solve_model(problem, limits, backend, time_limit, mip_gap, keep=keep)
        res.stats["reduction"] = {**info, "lp": "not solved"}
        return res, dec, opt
    tol = bound.tolerance()
    count = 8 * (len(resources) + 1)  # options beyond the LP's own in the first core
    delta = core_delta(bound.reduced, count)
    solves = 0
    while True:
        core = keep & (bound.reduced <= delta + tol)
        left = None if time_limit is None else max(time_limit - (time.perf_counter() - t0), 1e-3)
        res, dec, opt = _solve_model(problem, limits, backend, left, mip_gap, keep=core)
        solves += 1
        whole = bool((core == keep).all())
        info.update(
            lower_bound=bound.lower,
            multipliers=dict(zip(resources, bound.lam.tolist(), strict=True)),
            core_options=int(core.sum()),
            free_decisions=int((core.sum(axis=1) > 1).sum()),
            delta=float(delta),
            core_solves=solves,
        )
        res.stats["reduction"] = info
        if whole or res.status in ("time_limit", "no_solution"):
            return res, dec, opt
        if res.x is None:  # no plan in this core: let more options in
            count *= 4
            delta = max(core_delta(bound.reduced, count), 2 * delta, tol)
            continue
        upper = problem.distortion_of(_round(problem, res.x, dec, opt))
        if upper - bound.lower <= delta + tol:
            return res, dec, opt
        delta = upper - bound.lower


def _round(
    problem: AllocationProblem, x: np.ndarray, dec: np.ndarray, opt: np.ndarray
) -> np.ndarray:
    """The option with the largest ``x`` per decision (ties: the lowest index)."""
    grid = np.full(problem.distortion.shape, -1.0)
    grid[dec, opt] = x
    return np.argmax(grid, axis=1).astype(np.int64)


def least_given_others(problem: AllocationProblem, backend: Backend = "highs") -> dict[str, float]:
    """Per budgeted resource ``r``: the least amount of ``r`` any plan uses while keeping every
    *other* budget (``inf`` when the other budgets alone are already infeasible). With one
    budget this is :meth:`AllocationProblem.min_costs`."""
    out: dict[str, float] = {}
    for r in problem.limits:
        others = {k: v for k, v in problem.limits.items() if k != r}
        if not others:
            out[r] = problem.min_costs()[r]
            continue
        res, dec, opt = _solve_model(
            problem, others, backend, None, 0.0, objective=np.asarray(problem.costs[r], float)
        )
        if res.x is None or res.status == "infeasible":
            out[r] = float("inf")
        else:
            out[r] = problem.cost_of(_round(problem, res.x, dec, opt))[r]
    return out


def solve_ilp(
    problem: AllocationProblem,
    *,
    backend: Backend = "highs",
    time_limit: float | None = None,
    mip_gap: float = 0.0,
    reduce: bool = True,
) -> Solution:
    """The least-distortion plan within every budget (exact when ``mip_gap == 0``).

    ``reduce`` (default) solves on a core of options first (:mod:`mpq.solvers._reduce`:
    dominated options dropped, reduced-cost fixing from the LP's Lagrangian bound), which
    returns the same optimum; ``stats["reduction"]`` says what was kept. ``reduce=False``
    hands the whole model to the backend.

    Status ``optimal`` (proven within ``mip_gap``; ``stats["gap"]`` is the solver's final
    relative gap where it reports one), ``time_limit`` (stopped at ``time_limit`` seconds with
    an incumbent, which is returned; when the solver had none yet, the greedy plan is returned
    if it fits, ``stats["incumbent"] = "greedy"``), ``feasible`` (after a tolerance repair,
    see the module docstring) or ``infeasible`` (``min_feasible`` is the per-resource least
    of :meth:`AllocationProblem.min_costs`; when several budgets are only jointly infeasible,
    ``stats["least_given_other_budgets"]`` tells how far each one must go with the others
    kept). Raises ``MpqError`` when the time limit passes with no plan found at all.

    ``mip_gap`` is the backend's relative gap, ``(incumbent - bound) / incumbent``: the plan is
    within ``1 / (1 - mip_gap)`` of the optimum. ``time_limit`` is in seconds of wall time.
    """
    t0 = time.perf_counter()
    validate_problem(problem)
    if mip_gap < 0:
        raise ValueError(f"mip_gap={mip_gap} must be >= 0")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit={time_limit} must be positive seconds (or None)")
    name = f"ilp-{backend}" if backend != "highs" else "ilp"
    if over_min(problem):
        return infeasible(problem, name, time.perf_counter() - t0)
    if not problem.decisions:  # nothing to decide (the backends refuse empty models)
        return done(problem, np.zeros(0, dtype=np.int64), "optimal", name, t0, {"backend": backend})
    limits = {r: float(v) for r, v in problem.limits.items()}
    repairs = 0
    while True:
        left = None if time_limit is None else max(time_limit - (time.perf_counter() - t0), 1e-3)
        solve = _solve_reduced if reduce else _solve_model
        res, dec, opt = solve(problem, limits, backend, left, mip_gap)
        stats = dict(res.stats)
        stats.update(variables=len(dec), decisions=len(problem.decisions), repairs=repairs)
        if res.status == "infeasible" and repairs:
            # Only the tightened model is infeasible: every plan lies within the solver's
            # tolerance of a limit. Fall back to the greedy plan, which is exactly feasible.
            return _fallback(problem, name, t0, stats, "feasible", time_limit)
        if res.status == "infeasible":
            sol = infeasible(problem, name, time.perf_counter() - t0)
            least = least_given_others(problem, backend) if len(problem.limits) > 1 else {}
            stats["least_given_other_budgets"] = least
            return replace(sol, stats=stats)
        if res.x is None:
            return _fallback(problem, name, t0, stats, "time_limit", time_limit)
        choice = _round(problem, res.x, dec, opt)
        over = excess(problem, problem.cost_of(choice))
        if not any(v > 0 for v in over.values()) and problem.feasible(choice):
            status = res.status
            if status == "optimal" and (repairs or mip_gap > 0):
                gap = stats.get("gap")
                exact = gap is not None and float(gap) <= 1e-9 and not repairs
                status = "optimal" if exact else "feasible"
            return done(problem, choice, status, name, t0, stats)
        repairs += 1
        if repairs > 5:
            raise MpqError(
                f"{name}: the solver's plans keep exceeding the budget by its tolerance "
                f"({over}); rescale the costs (e.g. bytes instead of bits)"
            )
        for r, v in over.items():
            if v > 0:
                limits[r] -= 2 * v + abs(limits[r]) * RTOL


def solve_ilp_cbc(problem: AllocationProblem) -> Solution:
    """:func:`solve_ilp` on the PuLP/CBC backend (for a name -> solver table)."""
    return solve_ilp(problem, backend="cbc")


def solve_ilp_full(problem: AllocationProblem, backend: Backend = "highs") -> Solution:
    """:func:`solve_ilp` without the core reduction (the whole model to the backend)."""
    return solve_ilp(problem, backend=backend, reduce=False)


def _fallback(
    problem: AllocationProblem,
    name: str,
    t0: float,
    stats: dict[str, Any],
    status: str,
    time_limit: float | None,
) -> Solution:
    """The greedy plan as the answer when the backend has none (time limit without incumbent,
    or a tolerance repair that left no plan); an error when greedy finds none either."""
    from mpq.solvers.greedy import solve_greedy

    greedy = solve_greedy(problem)
    if greedy.status != "infeasible" and problem.feasible(greedy.choice):
        stats["incumbent"] = "greedy"
        return done(problem, greedy.choice, status, name, t0, stats)
    raise MpqError(
        f"{name}: no plan found (time_limit={time_limit}s, repairs={stats.get('repairs')}) and "
        f"the greedy plan does not fit; raise the time limit"
    )
