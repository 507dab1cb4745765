"""The problem builder: targets + sensitivity table + candidate formats + cost model + budget
become one numpy `AllocationProblem`; a `Solution` becomes a `BitPlan`.

Budgets are given in user units (``bits``: average stored bits per target weight, scales and
zero-points included; ``bytes``: total bytes of the quantized model, every high-precision tensor
included; ``bops``: weight bits x activation bits x MACs on the cost model's sample input;
``latency``: measured seconds) and turned into limits on the decisions' costs by
:mod:`mpq.cost`, which owns every budget conversion; the costs are the cost model's storage
(mpq's packed layout, or an export container's bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mpq.cost import RESOURCES, CostModel, check_budget, parse_budget, to_limit, to_user
from mpq.errors import MpqError
from mpq.formats import QuantFormat, fits
from mpq.plan import BitPlan
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.base import AllocationProblem, Solution
from mpq.targets import Target, decisions

__all__ = [
    "build_problem",
    "parse_budget",
    "plan_for_choice",
    "solution_to_plan",
    "to_limit",
    "to_user",
]


def build_problem(
    cost_model: CostModel,
    formats: Sequence[QuantFormat],
    budget: Mapping[str, float],
    table: SensitivityTable | None = None,
    *,
    latency: np.ndarray | None = None,
) -> AllocationProblem:
    """One decision per tie group (or lone target), one option per candidate format.

    ``latency``: optional ``[decisions, formats]`` seconds from a measured table
    (:func:`mpq.latency.latency_costs`), added as the ``latency`` resource; a ``latency``
    budget is then a limit on the summed seconds of the target layers.
    """
    if not formats:
        raise MpqError("no candidate formats; give at least one, e.g. --formats 4,8")
    groups = decisions(cost_model.targets)
    names = tuple(groups)
    specs = tuple(f.spec() for f in formats)
    if len(set(specs)) != len(specs):
        raise MpqError(f"candidate formats repeat: {list(specs)}")
    dist = np.zeros((len(names), len(formats)))
    costs = {
        r: np.zeros_like(dist)
        for r in RESOURCES
        if r != "latency" and (r != "bops" or cost_model.macs)
    }
    for d, name in enumerate(names):
        for o, fmt in enumerate(formats):
            members = groups[name]
            gptq_off = fmt.method == "gptq" and not fmt.keep  # GPTQ runs on Linear layers only
            if not all(fits(t.shape, fmt) and not (gptq_off and t.kind != "linear")
                       and cost_model.storage.refuses(t.shape, fmt) is None
                       for t in members):  # fmt: skip
                dist[d, o] = np.inf
                continue
            for t in members:
                bits, bops = cost_model.target_cost(t, fmt)
                costs["bits"][d, o] += bits
                costs["bytes"][d, o] += bits / 8
                if "bops" in costs and bops is not None:
                    costs["bops"][d, o] += bops
                if table is not None:
                    dist[d, o] += 0.0 if fmt.keep else table.distortion(t.name, fmt.spec())
    if latency is not None:
        lat = np.asarray(latency, dtype=float)
        if lat.shape != dist.shape:
            raise MpqError(
                f"latency costs have shape {lat.shape}, expected (decisions, formats) = "
                f"{dist.shape}; build them with mpq.latency.latency_costs for these formats"
            )
        costs["latency"] = lat
    if np.isinf(dist).all(axis=1).any():
        bad = [names[d] for d in np.flatnonzero(np.isinf(dist).all(axis=1))]
        raise MpqError(f"no candidate format fits {bad[:3]}; add a per-channel format")
    limits: dict[str, float] = {}
    for r, v in budget.items():
        if r not in costs:
            if r == "latency":
                raise MpqError(
                    "a latency budget needs measured costs: build_problem(..., latency="
                    "mpq.latency.latency_costs(table, cost_model, formats, backend=...))"
                )
            raise MpqError(f"budget on {r!r} needs MACs; build the cost model with a sample input")
        limits[r] = to_limit(cost_model, r, v)
    check_budget(cost_model, budget)
    problem = AllocationProblem(
        decisions=names,
        options=specs,
        distortion=dist,
        costs=costs,
        limits=limits,
        meta={"model_id": cost_model.model_id, "budget": dict(budget)},
    )
    mins = problem.min_costs()
    for r, v in budget.items():
        if mins[r] > limits[r] * (1 + 1e-12):
            raise MpqError(
                f"budget {r}={v:g} is infeasible with formats {list(specs)}: the smallest "
                f"achievable is {r}={to_user(cost_model, r, mins[r]):.6g}; raise the budget "
                f"or add cheaper formats"
            )
    return problem


def solution_to_plan(
    problem: AllocationProblem,
    solution: Solution,
    cost_model: CostModel,
    formats: Sequence[QuantFormat],
    *,
    objective: str = "",
) -> BitPlan:
    """The plan a solution stands for; an infeasible solution is an error with the least budget."""
    if solution.status == "infeasible":
        mins = solution.min_feasible or {}
        least = ", ".join(f"{r}={to_user(cost_model, r, v):.6g}" for r, v in mins.items())
        raise MpqError(
            f"{solution.solver}: the budget is infeasible; the smallest feasible is {least}"
        )
    return plan_for_choice(
        problem,
        solution.choice,
        cost_model.targets,
        formats,
        cost_model.model_id,
        solution.solver,
        objective=objective,
        meta={"status": solution.status, "predicted_distortion": solution.objective},
    )


def check_options(problem: AllocationProblem, formats: Sequence[QuantFormat]) -> None:
    """Raise :class:`MpqError` unless ``formats`` are the problem's options, in order."""
    specs = tuple(f.spec() for f in formats)
    if specs != tuple(problem.options):
        raise MpqError(
            f"formats {list(specs)} are not the problem's options {list(problem.options)}; "
            f"give the formats the problem was built with, in the same order"
        )


def plan_for_choice(
    problem: AllocationProblem,
    choice: np.ndarray,
    targets: Sequence[Target],
    formats: Sequence[QuantFormat],
    model_id: str,
    solver: str = "search",
    *,
    objective: str = "",
    meta: Mapping[str, Any] | None = None,
) -> BitPlan:
    """The plan a choice (one option index per decision) stands for: every member of a
    decision (tie group) gets the decision's format; the budget is the problem's."""
    check_options(problem, formats)
    choice = np.asarray(choice, dtype=np.int64)
    if choice.shape != (len(problem.decisions),):
        raise MpqError(f"choice has shape {choice.shape}, expected ({len(problem.decisions)},)")
    groups = decisions(targets)
    by_target: dict[str, QuantFormat] = {}
    for d, name in enumerate(problem.decisions):
        if name not in groups:
            raise MpqError(f"decision {name!r} is not a target or tie group of these targets")
        for t in groups[name]:
            by_target[t.name] = formats[int(choice[d])]
    return BitPlan(
        formats={t.name: by_target[t.name] for t in targets},
        model_id=model_id,
        solver=solver,
        objective=objective,
        budget=dict(problem.meta.get("budget", {})),
        meta=dict(meta or {}),
    )
