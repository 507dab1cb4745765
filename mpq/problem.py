"""The problem builder: targets + sensitivity table + candidate formats + cost model + budget
become one numpy `AllocationProblem`; a `Solution` becomes a `BitPlan`.

Budgets are given in user units and turned into limits on the decisions' costs here:

- ``bits``: average stored bits per target weight (scales and zero-points included);
- ``bytes``: total bytes of the quantized model, every high-precision tensor included;
- ``bops``: weight bits x activation bits x MACs on the cost model's sample input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from mpq.cost import RESOURCES, TIME_UNITS, CostModel
from mpq.errors import MpqError
from mpq.formats import KEEP, QuantFormat
from mpq.plan import BitPlan
from mpq.quantize import fits
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.base import AllocationProblem, Solution
from mpq.targets import decisions

# Byte units of ``bytes=`` budgets: decimal (kB = 1000) and binary (KiB = 1024); case-insensitive.
BYTE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Other spellings of a resource name.
RESOURCE_ALIASES = {"avg-bits": "bits", "avg_bits": "bits", "avgbits": "bits"}
_NUMBER_UNIT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]+)\s*$")


def parse_budget(text: str) -> dict[str, float]:
    """``"4.0"`` (bits), ``"bits=3.5"``, ``"avg-bits=4"``, ``"bytes=80e6"``, ``"bytes=60MB"``,
    ``"60MiB"`` (a number with a byte unit is a bytes budget), ``"bits=4,bops=1e12"``,
    ``"latency=0.002"`` / ``"latency=2ms"`` / ``"2ms"`` (seconds of the target layers, measured by
    ``mpq bench-layers``; units ``s``, ``ms``, ``us``, ``ns``).

    Byte units: ``B``, ``kB``, ``MB``, ``GB``, ``TB`` (powers of 1000) and ``KiB``, ``MiB``,
    ``GiB``, ``TiB`` (powers of 1024), in any letter case; ``avg-bits`` is ``bits``.
    """
    out: dict[str, float] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.rpartition("=")
        key = key.strip().lower()
        key = RESOURCE_ALIASES.get(key, key)
        number, unit = value.strip(), ""
        m = _NUMBER_UNIT.match(value)
        if m and m.group(2).lower() not in ("inf", "nan", "infinity"):
            number, unit = m.group(1), m.group(2)
        if not key:
            key = "latency" if unit.lower() in TIME_UNITS else "bytes" if unit else "bits"
        if key not in RESOURCES:
            raise MpqError(
                f"budget {part!r}: unknown resource {key!r}; use one of {list(RESOURCES)} "
                f"(avg-bits is bits)"
            )
        scale: float = 1
        if unit:
            if key not in ("bytes", "latency"):
                raise MpqError(
                    f"budget {part!r}: the unit {unit!r} applies to byte and latency budgets "
                    f"only; write {key}=<number>, bytes=<number><unit> (e.g. bytes=60MB) or "
                    f"latency=<number><unit> (e.g. latency=2ms)"
                )
            units: Mapping[str, float] = BYTE_UNITS if key == "bytes" else TIME_UNITS
            if unit.lower() not in units:
                known = (
                    "B, kB, MB, GB, TB (x1000) or KiB, MiB, GiB, TiB (x1024)"
                    if key == "bytes"
                    else "s, ms, us, ns"
                )
                raise MpqError(f"budget {part!r}: unknown unit {unit!r}; use one of {known}")
            scale = units[unit.lower()]
        try:
            amount = float(number) * scale
        except ValueError:
            raise MpqError(
                f"budget {part!r}: {value!r} is not a number; write e.g. bits=4.0, "
                f"bytes=80e6 or bytes=60MB"
            ) from None
        if not math.isfinite(amount):
            raise MpqError(f"budget {part!r}: {value!r} is not a finite number")
        if key in out:
            raise MpqError(f"budget {text!r} gives {key} twice; give each resource once")
        out[key] = amount
    if not out:
        raise MpqError(f"budget {text!r} is empty; write e.g. 'bits=4.0' or 'bytes=80e6'")
    return out


def to_limit(cost_model: CostModel, resource: str, value: float) -> float:
    """A budget in user units as a limit on the summed decision costs."""
    if resource == "bits":
        return value * cost_model.target_numel
    if resource == "bytes":
        return value - cost_model.fixed_bits / 8
    return value


def to_user(cost_model: CostModel, resource: str, amount: float) -> float:
    """Inverse of :func:`to_limit`."""
    if resource == "bits":
        return amount / cost_model.target_numel
    if resource == "bytes":
        return amount + cost_model.fixed_bits / 8
    return amount


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
            if not all(fits(t.shape, fmt) for t in members):
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
    _check_budget(cost_model, budget)
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


def _check_budget(cost_model: CostModel, budget: Mapping[str, float]) -> None:
    keep = {t.name: KEEP for t in cost_model.targets}
    fp = cost_model.plan_cost(BitPlan(formats=keep, model_id=cost_model.model_id))
    for r, v in budget.items():
        if v <= 0:
            raise MpqError(f"budget {r}={v:g} must be positive")
        if r == "latency":
            continue  # measured, not a property of the plan's bytes: no full-precision ceiling
        ceiling = fp.resource(r)
        if v > ceiling * (1 + 1e-12):
            raise MpqError(
                f"budget {r}={v:g} is above full precision ({r}={ceiling:.6g} with every "
                f"target kept at 16 bits): nothing to allocate; use uniform:16 or a lower budget"
            )


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
    groups = decisions(cost_model.targets)
    by_target = {}
    for d, name in enumerate(problem.decisions):
        for t in groups[name]:
            by_target[t.name] = formats[int(solution.choice[d])]
    plan = BitPlan(
        formats={t.name: by_target[t.name] for t in cost_model.targets},
        model_id=cost_model.model_id,
        solver=solution.solver,
        objective=objective,
        budget=dict(problem.meta.get("budget", {})),
        meta={"status": solution.status, "predicted_distortion": solution.objective},
    )
    return plan
