"""The "never worse than uniform" guarantee (library part; numpy only).

A mixed-precision plan is chosen on a model of quality (the table's additive distortion, or a
search on a measure); it can still measure worse than simply giving every decision the same
format. :func:`guard_uniform` measures both the mixed plan and the best uniform plan that fits
the budget (best by the table, as :func:`mpq.solvers.uniform.solve_uniform` picks it) with the
same ``measure`` (lower is better: the calibration KL of the quantized model, built by
:mod:`mpq.measure`) and returns the uniform plan, with the reason and both numbers, when the
mixed one is worse. Ties keep the mixed plan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from mpq.solvers._measure import Measure, cached
from mpq.solvers.base import AllocationProblem, Solution
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
