"""The steps every command shares: prepare a model, measure a table, solve, evaluate (cached)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpq import __version__
from mpq.cost import CostModel, build_cost_model
from mpq.errors import MpqError
from mpq.evaluate import EvalResult, Reference, evaluate, reference
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.models import LoadedModel, cache_root, load_model, sample_input
from mpq.plan import BitPlan, atomic_write_text, uniform_plan
from mpq.problem import build_problem, solution_to_plan
from mpq.sensitivity.base import Estimator
from mpq.sensitivity.measured import measured_damage
from mpq.sensitivity.runner import run_estimator
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.base import Solution, Solver
from mpq.solvers.closed_form import solve_closed_form
from mpq.solvers.greedy import solve_greedy
from mpq.solvers.ilp import solve_ilp, solve_ilp_cbc
from mpq.solvers.pareto import solve_pareto
from mpq.solvers.uniform import solve_uniform
from mpq.targets import DEFAULT_TIE_RULES, Target, discover
from mpq.tasks import Task, make_task

SOLVER_FUNCS: dict[str, Solver] = {
    "uniform": solve_uniform,
    "greedy": solve_greedy,
    "ilp": solve_ilp,
    "ilp-cbc": solve_ilp_cbc,
    "pareto": solve_pareto,
    "closed_form": solve_closed_form,
}


@dataclass
class Prepared:
    loaded: LoadedModel
    targets: list[Target]
    cost: CostModel
    # What mpq.precondition did to the fp model (recorded into every plan solved from it).
    precondition: dict[str, Any] = field(default_factory=lambda: {"method": "none", "params": {}})


def prepare(
    model_id: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] | None = None,
    ties: bool = True,
) -> Prepared:
    """Load the model, discover its targets (model defaults for ``exclude``), read its costs.

    MACs (for BOPs) are counted on :func:`~mpq.models.sample_input`: one sequence of the
    model's ``seq_len`` tokens, or one 224x224 image.
    """
    loaded = load_model(model_id)
    excl = loaded.default_exclude if exclude is None else tuple(exclude)
    targets = discover(loaded.model, include, excl, DEFAULT_TIE_RULES if ties else ())
    cost = build_cost_model(loaded.model, targets, loaded.model_id, sample_input(loaded))
    return Prepared(loaded, targets, cost)


def damage_table(
    prep: Prepared,
    formats: Sequence[QuantFormat],
    calib: Task,
    *,
    progress: bool = True,
) -> SensitivityTable:
    ref = reference(calib, prep.loaded.model, progress=progress)
    return measured_damage(
        prep.loaded.model,
        prep.targets,
        formats,
        calib,
        ref,
        model_id=prep.loaded.model_id,
        cache_root=cache_root() / "sensitivity",
        progress=progress,
    )


def sensitivity_table(
    prep: Prepared,
    estimator: Estimator,
    formats: Sequence[QuantFormat],
    calib: Task,
    *,
    progress: bool = True,
) -> SensitivityTable:
    """Any estimator's table for ``prep``'s targets, cached per target under the mpq cache."""
    return run_estimator(
        estimator,
        prep.loaded.model,
        prep.targets,
        calib,
        model_id=prep.loaded.model_id,
        formats=formats,
        cache_root=cache_root() / "sensitivity",
        progress=progress,
    )


def solve(
    prep: Prepared,
    solver: str,
    formats: Sequence[QuantFormat],
    budget: dict[str, float],
    table: SensitivityTable | None,
) -> tuple[BitPlan, Solution]:
    if solver not in SOLVER_FUNCS:
        raise MpqError(f"solver {solver!r} is unknown; use one of {sorted(SOLVER_FUNCS)}")
    if solver != "uniform" and table is None:
        raise MpqError(f"solver {solver!r} needs a sensitivity table")
    problem = build_problem(prep.cost, formats, budget, table)
    sol = SOLVER_FUNCS[solver](problem)
    plan = solution_to_plan(
        problem, sol, prep.cost, formats, objective=table.estimator if table else "cost"
    )
    if prep.precondition.get("method", "none") != "none":
        plan = dataclasses.replace(plan, meta={**plan.meta, "precondition": prep.precondition})
    return plan, sol


def plan_digest(plan: BitPlan) -> str:
    """Identifies what a plan computes (formats, model, mpq version), not its metadata."""
    body = json.dumps({n: f.to_dict() for n, f in plan.formats.items()}, sort_keys=True)
    return hashlib.sha256(f"{__version__}|{plan.model_id}|{body}".encode()).hexdigest()[:20]


@dataclass
class Evaluator:
    """Evaluates plans on one task, caching each result on disk; the fp reference is lazy."""

    prep: Prepared
    task: Task
    progress: bool = True
    _ref: Reference | None = field(default=None, init=False)

    def _cache_file(self, digest: str) -> Path:
        return (
            cache_root()
            / "evals"
            / self.prep.loaded.model_id.replace("/", "_")
            / (f"{self.task.key}-{digest}.json")
        )

    def reference(self) -> Reference:
        if self._ref is None:
            self._ref = reference(self.task, self.prep.loaded.model, progress=self.progress)
        return self._ref

    def __call__(self, plan: BitPlan | None, label: str = "") -> tuple[EvalResult, float]:
        """(metrics, seconds) of ``plan`` (None = the fp model); cached results cost 0 s."""
        digest = plan_digest(plan) if plan is not None else "fp32"
        path = self._cache_file(digest)
        if path.is_file():
            cached: dict[str, Any] = json.loads(path.read_text())
            return EvalResult(cached["metrics"], cached.get("units", {})), float(cached["seconds"])
        t0 = time.perf_counter()
        ref = self.reference()
        model = self.prep.loaded.model
        if plan is not None:
            model = apply_plan(model, plan, self.prep.targets, mode="fake")
        result = evaluate(self.task, model, ref, progress=self.progress, desc=label or "eval")
        seconds = time.perf_counter() - t0
        payload = {"metrics": result.metrics, "units": result.units, "seconds": seconds}
        atomic_write_text(path, json.dumps(payload))
        return result, seconds


def uniform_plans(prep: Prepared, formats: Sequence[QuantFormat]) -> list[BitPlan]:
    return [uniform_plan(prep.targets, f, prep.loaded.model_id) for f in formats]


def task_for(
    prep: Prepared,
    data_id: str,
    split: str,
    n: int | None,
    seq_len: int | None,
    batch_size: int | None,
    offset: int = 0,
) -> Task:
    return make_task(prep.loaded, data_id, split, n, seq_len, batch_size, offset)
