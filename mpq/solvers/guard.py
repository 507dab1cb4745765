"""The "never worse than uniform" guarantee (library part; numpy only).

A mixed-precision plan is chosen on a model of quality (the table's additive distortion, or a
search on a measure); it can still measure worse than simply giving every decision the same
format. :func:`guard_uniform` measures both the mixed plan and the best uniform plan that fits
the budget (best by the table, as :func:`mpq.solvers.uniform.solve_uniform` picks it) with the
same ``measure`` (lower is better: the calibration KL of the quantized model, built by
:mod:`mpq.calib_measure`) and returns the uniform plan, with the reason and both numbers, when the
mixed one is worse. Ties keep the mixed plan.

:func:`guard_unseen` is the same guarantee measured where it can see overfitting: on
calibration tokens that neither the table nor the search used (the caller's ``measure``), with
the log-perplexity (NLL) of language models. It also measures the uniform plans (up to the
first one above the budget that is as good as the mixed plan: no dearer one can change the
answer), places the mixed plan on the uniform curve and reports the nearest uniform plans on
both sides of the budget and the budget at which uniform quantization would reach the mixed
plan's quality (:func:`equal_quality_use`, interpolated linearly in the measured value: log
ppl for NLL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mpq.solvers.base import AllocationProblem, Solution
from mpq.solvers.measure import Measure, cached, uniform_choices
from mpq.solvers.uniform import solve_uniform


def guard_uniform(
    problem: AllocationProblem,
    solution: Solution,
    measure: Measure | None = None,
) -> tuple[Solution, str]:
    """``(solution, reason)``: the mixed ``solution`` when it measures no worse than the best
    uniform plan that fits the budget, else that uniform plan. ``measure=None`` compares on the
    table's summed distortion. The returned solution's ``stats`` gain ``guard`` (``kept``,
    ``replaced``, ``no_uniform`` or ``mixed_infeasible``), ``measured_mixed`` and
    ``measured_uniform``; a replacement names the mixed solver in ``stats["replaced"]``."""
    score = cached(measure, problem)
    uniform = solve_uniform(problem)
    if uniform.status == "infeasible":
        why = (
            f"no uniform plan fits the budget (least uniform use is above it); kept the "
            f"{solution.solver} plan ({solution.status})"
        )
        return _with(solution, guard="no_uniform"), why
    option = str(uniform.stats.get("option", ""))
    u_value = score(np.asarray(uniform.choice))
    if solution.status == "infeasible":
        why = (
            f"{solution.solver} found no plan, but uniform {option} fits the budget "
            f"(measured {u_value:.6g}); returning the uniform plan"
        )
        return _with(
            uniform, guard="mixed_infeasible", measured_uniform=u_value, replaced=solution.solver
        ), why
    m_value = score(np.asarray(solution.choice))
    if m_value > u_value:
        why = (
            f"the {solution.solver} plan measures {m_value:.6g}, worse than {u_value:.6g} for "
            f"uniform {option} that fits the same budget (lower is better); returning the "
            f"uniform plan"
        )
        return _with(
            uniform,
            guard="replaced",
            measured_mixed=m_value,
            measured_uniform=u_value,
            replaced=solution.solver,
        ), why
    why = (
        f"kept the {solution.solver} plan: it measures {m_value:.6g}, no worse than "
        f"{u_value:.6g} for uniform {option}"
    )
    return _with(solution, guard="kept", measured_mixed=m_value, measured_uniform=u_value), why


def _with(solution: Solution, **extra: Any) -> Solution:
    stats = dict(solution.stats)
    stats.update(extra)
    return replace(solution, stats=stats)


@dataclass(frozen=True)
class UniformPoint:
    """A uniform plan on the curve: its option, its use of the budgeted resource, its value."""

    option: str
    use: float
    value: float


def envelope(points: Sequence[UniformPoint]) -> list[UniformPoint]:
    """The uniform curve a user can actually buy: the points by use, each kept only when it is
    better (lower) than every cheaper one. A uniform format that a cheaper one beats is never
    the way to reach a quality (e.g. symmetric 5-bit after an asymmetric 4-bit that rides on a
    checkpoint's own grid), so it does not bend the curve."""
    out: list[UniformPoint] = []
    for p in sorted(points, key=lambda p: (p.use, p.value)):
        if not out or p.value < out[-1].value:
            out.append(p)
    return out


def equal_quality_use(points: Sequence[UniformPoint], value: float) -> float:
    """The resource use at which the uniform curve reaches ``value`` (lower is better).

    The curve is the :func:`envelope` of the points; the adjacent pair of it whose values
    bracket ``value`` is interpolated linearly in the value. ``nan`` when ``value`` is outside
    the curve's range (worse than the cheapest uniform plan, or better than the best).
    """
    pts = envelope(points)
    for a, b in zip(pts, pts[1:], strict=False):
        if b.value <= value <= a.value:
            return a.use + (b.use - a.use) * (a.value - value) / (a.value - b.value)
    if pts and pts[0].value == value:
        return pts[0].use
    return math.nan


def _resource(problem: AllocationProblem) -> str:
    return "bits" if "bits" in problem.limits else next(iter(problem.limits))


def _uniform_uses(problem: AllocationProblem) -> list[tuple[int, float]]:
    """``(option index, use)`` of every uniform plan the problem allows, by use (stable)."""
    resource = _resource(problem)
    n = len(problem.decisions)
    out = []
    for o in range(len(problem.options)):
        choice = np.full(n, o, dtype=np.int64)
        if bool(problem.allowed[np.arange(n), choice].all()):
            out.append((o, float(problem.cost_of(choice)[resource])))
    return sorted(out, key=lambda t: t[1])


def uniform_curve(
    problem: AllocationProblem, measure: Measure, *, until: float | None = None
) -> list[UniformPoint]:
    """The uniform plans the problem allows (whatever the budget), measured, by use.

    ``until`` (a value): stop measuring at the first plan above the budget whose value is at
    most ``until`` (and the plans of the same use): every dearer plan is left unmeasured. The
    points returned then still give the budget's fitting plans, the cheapest one above it and
    :func:`equal_quality_use` of ``until`` exactly as the whole curve does (the envelope's
    crossing of ``until`` is at or before that plan)."""
    n = len(problem.decisions)
    limit = problem.limits.get(_resource(problem), math.inf)
    out: list[UniformPoint] = []
    stop_at: float | None = None
    for o, use in _uniform_uses(problem):
        if stop_at is not None and use > stop_at:
            break
        value = float(measure(np.full(n, o, dtype=np.int64)))
        out.append(UniformPoint(problem.options[o], use, value))
        if until is not None and stop_at is None and use > limit and value <= until:
            stop_at = use
    return out


def guard_unseen(
    problem: AllocationProblem, solution: Solution, measure: Measure
) -> tuple[Solution, str]:
    """:func:`guard_uniform` on unseen calibration tokens, with the uniform curve around it.

    ``measure``: the quality on tokens the table and the search did not use (lower is better).
    The returned solution's stats gain, besides ``guard``, ``measured_mixed`` and
    ``measured_uniform``: ``uniform_below`` / ``uniform_above`` (the dearest uniform option
    within the budget and the cheapest above it, with ``measured_below`` / ``measured_above``),
    ``resource`` and ``equal_use``: the resource use at which the uniform curve measures what
    the mixed plan measures (``nan`` outside the curve), and ``mixed_use``."""
    score = cached(measure, problem)
    resource = _resource(problem)
    limit = float(problem.limits[resource])
    fits = uniform_choices(problem)
    mixed = solution.status != "infeasible" and bool(fits)
    m_value = score(np.asarray(solution.choice)) if mixed else math.nan
    # Uniform plans dearer than the first one above the budget that measures as well as the
    # mixed plan change nothing below: they are not measured (the first solve of a table
    # measures far fewer of them; later ones read the evaluator's cache).
    curve = uniform_curve(problem, score, until=m_value if mixed else None)
    fitting = {problem.options[int(c[0])] for c in fits}
    below = [p for p in curve if p.option in fitting]
    above = [p for p in curve if p.option not in fitting and p.use > limit]
    extra: dict[str, Any] = {"resource": resource}
    if below:
        extra["uniform_below"], extra["measured_below"] = below[-1].option, below[-1].value
    if above:
        extra["uniform_above"], extra["measured_above"] = above[0].option, above[0].value
    if not mixed:
        sol, why = guard_uniform(problem, solution, score)
        return _with(sol, **extra), why
    extra["mixed_use"] = float(problem.cost_of(np.asarray(solution.choice))[resource])
    extra["equal_use"] = equal_quality_use(curve, m_value)
    best = min((p for p in curve if p.option in fitting), key=lambda p: (p.value, p.use))
    if m_value > best.value:
        choice = np.full(len(problem.decisions), problem.options.index(best.option))
        uniform = Solution(
            choice=choice,
            status="feasible",
            objective=problem.distortion_of(choice),
            costs=problem.cost_of(choice),
            solver="uniform",
            wall_time=solution.wall_time,
            stats={"option": best.option},
        )
        why = (
            f"on unseen calibration tokens the {solution.solver} plan measures {m_value:.6g}, "
            f"worse than {best.value:.6g} for uniform {best.option} within the same budget "
            f"(lower is better); returning the uniform plan"
        )
        return _with(
            uniform,
            guard="replaced",
            measured_mixed=m_value,
            measured_uniform=best.value,
            replaced=solution.solver,
            **extra,
        ), why
    why = (
        f"kept the {solution.solver} plan: on unseen calibration tokens it measures "
        f"{m_value:.6g}, no worse than {best.value:.6g} for uniform {best.option}"
    )
    return _with(
        solution, guard="kept", measured_mixed=m_value, measured_uniform=best.value, **extra
    ), why
