"""The steps every command shares: prepare a model, measure a table, solve, evaluate (cached)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpq import __version__
from mpq.cache import (
    CODE_VERSION,
    data_fingerprint,
    key_digest,
    model_folder,
    non_finite,
    read_entry,
    weights_fingerprint,
    write_entry,
)
from mpq.errors import MpqError
from mpq.evaluate import EvalResult, Reference, evaluate, evaluate_reference, reference
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.models import cache_root
from mpq.plan import BitPlan, uniform_plan
from mpq.prepared import Prepared, preconditioned, prepare, prepared_for_plan, task_for
from mpq.problem import build_problem, solution_to_plan
from mpq.quant.core import QuantizedTensor
from mpq.quantstore import QuantStore
from mpq.registry import SEARCHES, SOLVERS, solver_names
from mpq.sensitivity.base import Estimator
from mpq.sensitivity.measured import Measured
from mpq.sensitivity.runner import run_estimator
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.base import AllocationProblem, Solution
from mpq.solvers.options import SearchOptions
from mpq.tasks import CalibSpec, Task

log = logging.getLogger("mpq.cache")

# Re-exported: every command reaches the pipeline's steps from here.
__all__ = [
    "CalibSpec",
    "Evaluator",
    "Prepared",
    "SearchOptions",
    "damage_table",
    "plan_digest",
    "preconditioned",
    "prepare",
    "prepared_for_plan",
    "sensitivity_table",
    "solve",
    "task_for",
    "uniform_plans",
]


def damage_table(
    prep: Prepared,
    formats: Sequence[QuantFormat],
    calib: Task,
    *,
    progress: bool = True,
    anchor: str | None = None,
    stats_task: Task | None = None,
) -> SensitivityTable:
    """The measured-KL table of ``formats`` on ``calib`` (``anchor``: only that format measured,
    the others carried by output error; ``stats_task``: the mse/gptq statistics' windows)."""
    ref = reference(calib, prep.loaded.model, progress=progress)
    return sensitivity_table(
        prep,
        Measured(anchor=anchor or ""),
        formats,
        calib,
        progress=progress,
        stats_task=stats_task,
        ref=ref,
    )


def sensitivity_table(
    prep: Prepared,
    estimator: Estimator,
    formats: Sequence[QuantFormat],
    calib: Task,
    *,
    progress: bool = True,
    stats_task: Task | None = None,
    ref: Reference | None = None,
) -> SensitivityTable:
    """Any estimator's table for ``prep``'s targets, cached per target under the mpq cache
    (``stats_task``: where mse / gptq formats' input statistics come from; default ``calib``;
    ``ref``: the fp reference on ``calib``, when the caller has it)."""
    return run_estimator(
        estimator,
        prep.loaded.model,
        prep.targets,
        calib,
        model_id=prep.loaded.model_id,
        formats=formats,
        cache_root=cache_root() / "sensitivity",
        progress=progress,
        reference=ref,
        stats_task=stats_task,
    )


def solve(
    prep: Prepared,
    solver: str,
    formats: Sequence[QuantFormat],
    budget: dict[str, float],
    table: SensitivityTable | None,
    *,
    calib: Task | None = None,
    search: SearchOptions | None = None,
    guard: bool = False,
    latency: Any = None,
    progress: bool = False,
    guard_task: Task | None = None,
    stats_task: Task | None = None,
) -> tuple[BitPlan, Solution]:
    """Solve one budget with ``solver`` on ``table`` and return (plan, solution).

    The searches (``bayes``, ``evolution``, ``sac``) and ``guard=True`` measure plans on the
    calibration task ``calib`` (each plan's metrics cached on disk by an :class:`Evaluator`).
    ``guard=True`` is the never-worse-than-uniform guarantee
    (:func:`mpq.solvers.guard.guard_uniform`): when the mixed plan measures worse than the best
    uniform plan that fits the budget, the uniform plan is returned; the plan's ``meta`` says
    which happened and why (``guard``, ``guard_reason``, ``measured_mixed``,
    ``measured_uniform``). ``latency``: the ``[decisions, formats]`` seconds of a latency table,
    for a ``latency=`` budget.
    ``guard_task``: calibration tokens that neither the table nor the search used; with it the
    guard measures there (NLL where the task has labels, else the search metric) with
    :func:`mpq.solvers.guard.guard_unseen`, and ``meta`` also gets the nearest uniform plans on both
    sides of the budget and ``equal_quality`` / ``saved`` (the budget at which uniform
    quantization measures the same as the plan, in the budget's units, and the difference).
    ``stats_task``: the windows the plan's mse / gptq statistics come from, recorded in the plan
    (default ``calib``)."""
    if solver not in SOLVERS and solver not in SEARCHES:
        raise MpqError(f"solver {solver!r} is unknown; use one of {solver_names()}")
    if solver != "uniform" and table is None:
        raise MpqError(f"solver {solver!r} needs a sensitivity table")
    opts = search or SearchOptions()
    problem = build_problem(prep.cost, formats, budget, table, latency=latency)
    measure = None
    if solver in SEARCHES or (guard and solver != "uniform"):
        if calib is None:
            raise MpqError(
                f"solver {solver!r}{' with the uniform guard' if guard else ''} measures plans: "
                f"give calibration data (calib=Task)"
            )
        from mpq.calib_measure import evaluator_measure

        evaluator = Evaluator(prep, calib, progress=False)
        measure = evaluator_measure(
            evaluator, problem, formats, metric=opts.metric, progress=progress,
            stats_task=stats_task or calib,
        )  # fmt: skip
        if solver == "bayes" and opts.study is None and opts.storage is not None:
            from mpq.solvers.bayes import fingerprint

            # A study's stored values are measurements of these weights on this data.
            salt = key_digest(evaluator.fingerprint())[:8]
            study = f"mpq-bayes-{fingerprint(problem)}-{salt}-seed{opts.seed}"
            opts = dataclasses.replace(opts, study=study)
    if solver in SEARCHES:

        def features(problem: AllocationProblem) -> np.ndarray:
            from mpq.calib_measure import decision_features

            return decision_features(problem, prep.targets, prep.loaded.model)

        sol = SEARCHES.load(solver)(opts, features)(problem, measure)
    else:
        sol = SOLVERS.load(solver)(problem)
    reason = ""
    if guard and solver != "uniform" and guard_task is not None:
        from mpq.calib_measure import evaluator_measure
        from mpq.solvers.guard import guard_unseen

        unseen = evaluator_measure(
            Evaluator(prep, guard_task, progress=False, memo=evaluator.memo),
            problem,
            formats,
            metric="nll" if guard_task.labels is not None else opts.metric,
            stats_task=stats_task or calib,
        )
        sol, reason = guard_unseen(problem, sol, unseen)
        sol = _equal_quality(sol, prep)
    elif guard and solver != "uniform":
        from mpq.solvers.guard import guard_uniform

        sol, reason = guard_uniform(problem, sol, measure)
    plan = solution_to_plan(
        problem, sol, prep.cost, formats, objective=table.estimator if table else "cost"
    )
    meta = {**plan.meta, **_stats_meta(sol.stats)}
    if reason:
        meta["guard_reason"] = reason
    if solver in SEARCHES:
        meta["search"] = {**dataclasses.asdict(opts), "storage": _redacted(opts.storage)}
    if prep.precondition.method != "none":
        meta["precondition"] = prep.precondition.to_dict()
    from mpq.planstats import with_record

    return with_record(dataclasses.replace(plan, meta=meta), stats_task or calib), sol


def _equal_quality(sol: Solution, prep: Prepared) -> Solution:
    """The guard's ``equal_use`` / ``mixed_use`` in the budget's units (bits per weight, bytes)."""
    from mpq.cost import to_user

    stats = dict(sol.stats)
    resource = str(stats.get("resource", ""))
    equal, used = stats.get("equal_use"), stats.get("mixed_use")
    if resource and isinstance(equal, float) and isinstance(used, float) and equal == equal:
        stats["equal_quality"] = to_user(prep.cost, resource, equal)
        stats["saved"] = stats["equal_quality"] - to_user(prep.cost, resource, used)
    return dataclasses.replace(sol, stats=stats)


def _stats_meta(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-scalar entries of a solution's stats (what a plan file can carry)."""
    out: dict[str, Any] = {}
    for k, v in stats.items():
        if isinstance(v, bool | int | str) or (isinstance(v, float) and v == v):
            out[k] = v
    return out


def _redacted(storage: str | None) -> str | None:
    if storage is None:
        return None
    from mpq.solvers.bayes import redact

    return redact(str(storage))


def plan_digest(plan: BitPlan) -> str:
    """Identifies what a plan computes (formats, model, mpq version), not its metadata."""
    body = json.dumps({n: f.to_dict() for n, f in plan.formats.items()}, sort_keys=True)
    from mpq.planstats import digest_part
    from mpq.quant.core import QUANT_VERSION

    text = f"{__version__}|q{QUANT_VERSION}|{plan.model_id}|{body}|{digest_part(plan)}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _eval_nan_ok(path: str) -> bool:
    """NaN is a valid standard error (one unit has none); any other NaN is a broken result."""
    return path.endswith("_se")


def _eval_entry_problem(value: Any) -> str | None:
    if not isinstance(value, dict) or set(value) != {"metrics", "units", "seconds"}:
        return "expected exactly metrics, units, seconds"
    metrics, units, seconds = value["metrics"], value["units"], value["seconds"]
    if not isinstance(metrics, dict) or not metrics:
        return "metrics is not a non-empty object"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()):
        return "a metric is not a number"
    if "kl" not in metrics or metrics["kl"] < -1e-9:
        return "no KL or a negative one"
    if not isinstance(units, dict) or not all(isinstance(v, list) for v in units.values()):
        return "units is not an object of lists"
    if not isinstance(seconds, int | float) or seconds < 0:
        return "seconds is not a non-negative number"
    return None


QuantMemo = dict[str, MutableMapping[tuple[str, str], QuantizedTensor | None]]
"""Quantized weights an :class:`Evaluator` reuses: statistics key -> (target, spec) -> weight
(a :class:`mpq.quantstore.QuantStore`: kept on disk between runs)."""


@dataclass
class Evaluator:
    """Evaluates plans on one task, caching each result on disk; the fp reference is lazy.

    Cache: ``$MPQ_CACHE/evals/<model>/<task key>-<digest>.json``, the digest over the plan's
    digest, the sha256 of the model's state dict, a sha256 of the task's batches and labels,
    the mpq and cache code versions (:mod:`mpq.cache`). Entries are checked on read (bad ones
    are logged and recomputed) and non-finite results are never stored."""

    prep: Prepared
    task: Task
    progress: bool = True
    # Quantized weights by statistics key, then (target, format spec): each (target, format)
    # is quantized once for all the plans evaluated (apply_plan's memo), and kept on disk
    # (mpq.quantstore: the table's quantizations and earlier runs' are read back). Evaluators of
    # one prepared model on several tasks may share one (compare does).
    memo: QuantMemo = field(default_factory=dict)
    _ref: Reference | None = field(default=None, init=False)
    _base: dict[str, Any] | None = field(default=None, init=False)

    def fingerprint(self) -> dict[str, Any]:
        """What every cached result of this evaluator depends on besides the plan."""
        if self._base is None:
            self._base = {
                "code": CODE_VERSION,
                "mpq": __version__,
                "model": self.prep.loaded.model_id,
                "weights": weights_fingerprint(self.prep.loaded.model),
                "task": self.task.key,
                "data": data_fingerprint(self.task.batches, self.task.labels),
            }
        return self._base

    def _cache_file(self, key: str) -> Path:
        return (
            cache_root()
            / "evals"
            / model_folder(self.prep.loaded.model_id)
            / (f"{self.task.key}-{key}.json")
        )

    def reference(self) -> Reference:
        if self._ref is None:
            self._ref = reference(self.task, self.prep.loaded.model, progress=self.progress)
        return self._ref

    def __call__(self, plan: BitPlan | None, label: str = "") -> tuple[EvalResult, float]:
        """(metrics, seconds) of ``plan`` (None = the fp model); cached results cost 0 s."""
        digest = plan_digest(plan) if plan is not None else "fp32"
        key = key_digest({**self.fingerprint(), "plan": digest})
        path = self._cache_file(key)
        cached = read_entry(path, key, _eval_entry_problem, _eval_nan_ok)
        if cached is not None:
            return EvalResult(cached["metrics"], cached["units"]), float(cached["seconds"])
        t0 = time.perf_counter()
        ref = self.reference()
        if plan is None:  # the model that gave the reference: its logits are already there
            result = evaluate_reference(self.task, ref)
        else:
            from mpq.planstats import digest_part, plan_stats

            stats = plan_stats(self.prep.loaded, self.prep.targets, plan)
            part = digest_part(plan)
            if part not in self.memo:  # written through to disk: the table's, the last run's
                self.memo[part] = QuantStore.open(
                    cache_root() / "quant", self.prep.loaded.model_id,
                    self.fingerprint()["weights"], stats,
                )  # fmt: skip
            memo = self.memo[part]
            model = apply_plan(
                self.prep.loaded.model, plan, self.prep.targets, mode="fake", stats=stats,
                memo=memo,
            )  # fmt: skip
            result = evaluate(self.task, model, ref, progress=self.progress, desc=label or "eval")
        seconds = time.perf_counter() - t0
        payload = {"metrics": result.metrics, "units": result.units, "seconds": seconds}
        bad = non_finite(payload, _eval_nan_ok)
        if bad is None:
            write_entry(path, key, payload, _eval_nan_ok)
        else:
            log.warning(
                "the evaluation of %s on %s is not finite (%s); not caching it",
                label or "the plan", self.task.key, bad,
            )  # fmt: skip
        return result, seconds


def uniform_plans(prep: Prepared, formats: Sequence[QuantFormat]) -> list[BitPlan]:
    return [uniform_plan(prep.targets, f, prep.loaded.model_id) for f in formats]
