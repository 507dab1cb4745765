"""Measured quality of plans for the search solvers (torch side).

The searches of :mod:`mpq.solvers` (``bayes``, ``evolution``, ``sac``) and the uniform guard
(:mod:`mpq.solvers.guard`) take a ``measure(choice) -> float`` (lower is better). Here it is
built from a model: the choice becomes a :class:`~mpq.plan.BitPlan` (:func:`plan_for_choice`),
the plan is applied with ``apply_plan(mode="fake")`` and evaluated against the fp reference on
a calibration :class:`~mpq.tasks.Task` (:func:`mpq.evaluate.evaluate`); the metric (mean KL by
default) is the value. Every measure here is a :class:`~mpq.solvers.measure.CachedMeasure`:
no choice is measured twice, and one measure can be shared by several searches and the guard.

- :class:`CalibrationMeasure`: model + targets + task (+ reference). It applies each plan to
  a private copy of the model, in place, and restores the copied weights afterwards, so the
  caller's model is never touched and no per-plan deep copy is made. Formats that quantize
  activations (``act_bits`` < 16) make ``apply_plan`` add forward hooks, which restoring the
  weights would not undo: with such formats each plan is applied to a fresh copy instead.
- :func:`evaluator_measure`: on a :class:`mpq.pipeline.Evaluator`, whose on-disk cache (one
  file per plan digest) also spans runs: what ``mpq solve`` should use.
- :func:`decision_features`: the per-decision features of the SAC agent's observation
  (kind, rows, cols, parameter count, weight std and excess kurtosis).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from mpq.errors import MpqError
from mpq.evaluate import Reference, evaluate, reference
from mpq.executor import apply_plan
from mpq.formats import KEEP_BITS, QuantFormat
from mpq.plan import BitPlan
from mpq.problem import check_options, plan_for_choice
from mpq.solvers.base import AllocationProblem
from mpq.solvers.measure import CachedMeasure
from mpq.solvers.sac import FEATURE_COLUMNS, KIND_CODES
from mpq.targets import Target, decisions
from mpq.tasks import Task

if TYPE_CHECKING:
    from mpq.evaluate import EvalResult
    from mpq.prepared import Prepared


class PlanEvaluator(Protocol):
    """What :func:`evaluator_measure` needs (:class:`mpq.pipeline.Evaluator` is one): the
    prepared model, and ``(metrics, seconds)`` of a plan on the calibration task."""

    prep: Prepared

    def __call__(self, plan: BitPlan | None, label: str = "") -> tuple[EvalResult, float]: ...


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    w = model.get_submodule(name).weight
    if not isinstance(w, torch.Tensor):
        raise MpqError(f"target {name!r} has no weight tensor")
    return w.data


def _check_targets(problem: AllocationProblem, targets: Sequence[Target]) -> None:
    names = tuple(decisions(targets))
    if names != tuple(problem.decisions):
        missing = sorted(set(problem.decisions) ^ set(names))[:3]
        raise MpqError(
            f"the targets' decisions do not match the problem's ({len(names)} vs "
            f"{len(problem.decisions)} decisions; differing: {missing}); give the targets "
            f"the problem was built from"
        )


class CalibrationMeasure(CachedMeasure):
    """``metric`` (``kl`` by default; any key of :class:`~mpq.evaluate.EvalResult`) of the
    model quantized by each choice, on ``task`` against ``ref`` (computed once when not
    given). ``copy_model=False`` applies plans to ``model`` itself and restores its weights
    after each measurement (saves one model of memory). ``calib``: calibration batches for
    GPTQ formats (passed to :func:`~mpq.executor.apply_plan`)."""

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[Target],
        problem: AllocationProblem,
        formats: Sequence[QuantFormat],
        task: Task,
        ref: Reference | None = None,
        *,
        metric: str = "kl",
        model_id: str = "",
        copy_model: bool = True,
        calib: Sequence[Any] | None = None,
    ) -> None:
        check_options(problem, formats)
        _check_targets(problem, targets)
        self.problem = problem
        self.targets = list(targets)
        self.formats = list(formats)
        self.task = task
        self.metric = metric
        self.model_id = model_id or str(problem.meta.get("model_id", ""))
        self.calib = calib
        # Activation quantization adds forward hooks: apply each plan to a fresh copy then.
        self.inplace = all(f.act_bits == KEEP_BITS for f in formats)
        self.model = copy.deepcopy(model) if copy_model and self.inplace else model
        self.ref = ref if ref is not None else reference(task, self.model)
        with torch.no_grad():
            self._saved = (
                {t.name: _weight(self.model, t.name).clone() for t in self.targets}
                if self.inplace
                else {}
            )
        # Each (target, format) is quantized once over all the plans measured (apply_plan's
        # memo): the weights it quantizes from are restored to the originals after each plan.
        self._memo: dict[tuple[str, str], Any] = {}
        super().__init__(self._measure, len(problem.decisions))

    def plan(self, choice: np.ndarray) -> BitPlan:
        return plan_for_choice(
            self.problem, choice, self.targets, self.formats, self.model_id, "measure"
        )

    def _measure(self, choice: np.ndarray) -> float:
        plan = self.plan(choice)
        if not self.inplace:
            fresh = apply_plan(
                self.model, plan, self.targets, mode="fake", calib=self.calib, memo=self._memo
            )
            result = evaluate(self.task, fresh, self.ref)
            return self._value(result.metrics)
        try:
            apply_plan(
                self.model, plan, self.targets, mode="fake", inplace=True, calib=self.calib,
                memo=self._memo,
            )  # fmt: skip
            result = evaluate(self.task, self.model, self.ref)
        finally:
            with torch.no_grad():
                for t in self.targets:
                    _weight(self.model, t.name).copy_(self._saved[t.name])
        return self._value(result.metrics)

    def _value(self, metrics: Mapping[str, float]) -> float:
        if self.metric not in metrics:
            raise MpqError(
                f"metric {self.metric!r} is not measured on this task; use one of {sorted(metrics)}"
            )
        return float(metrics[self.metric])


def evaluator_measure(
    evaluator: PlanEvaluator,
    problem: AllocationProblem,
    formats: Sequence[QuantFormat],
    *,
    metric: str = "kl",
    progress: bool = False,
    stats_task: Task | None = None,
) -> CachedMeasure:
    """A measure on a :class:`mpq.pipeline.Evaluator` (its task is the calibration task):
    cached in memory here and on disk by the evaluator (one file per plan digest).
    ``progress``: a tqdm counter of the plans measured (the evaluator's own bars stay off).
    ``stats_task``: the windows the formats' mse / gptq statistics come from, recorded in every
    measured plan as :func:`mpq.pipeline.solve` records them in the plan it returns, so a
    search measures the quantizer that will be deployed (without it, ``mse`` formats are
    measured with the unweighted error and ``gptq`` is refused)."""
    from tqdm.auto import tqdm

    from mpq.planstats import with_record

    targets = evaluator.prep.targets
    check_options(problem, formats)
    _check_targets(problem, targets)
    model_id = evaluator.prep.loaded.model_id

    bar = tqdm(desc=f"measure plans ({metric})", unit="plan", disable=not progress)

    def measure(choice: np.ndarray) -> float:
        plan = plan_for_choice(problem, choice, targets, formats, model_id, "measure")
        result, _ = evaluator(with_record(plan, stats_task), label="measure")
        bar.update(1)
        if metric not in result.metrics:
            known = sorted(result.metrics)
            raise MpqError(f"metric {metric!r} is not measured; use one of {known}")
        return float(result.metrics[metric])

    return CachedMeasure(measure, len(problem.decisions))


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    if x.numel() < 4:
        return float("nan")
    c = x - x.mean()
    var = float((c * c).mean())
    if var <= 0:
        return float("nan")
    return float((c**4).mean()) / var**2 - 3.0


def decision_features(
    problem: AllocationProblem,
    targets: Sequence[Target],
    model: nn.Module | None = None,
) -> np.ndarray:
    """``[decisions, 6]`` features for :mod:`mpq.solvers.sac` (columns ``FEATURE_COLUMNS``:
    kind code, output rows, input columns x kernel, parameter count, weight std, excess
    kurtosis; the last two NaN without ``model``). A tie group sums its members' rows and
    parameters and pools their weights; its kind is its first member's."""
    _check_targets(problem, targets)
    groups = decisions(targets)
    out = np.full((len(problem.decisions), len(FEATURE_COLUMNS)), np.nan)
    for d, name in enumerate(problem.decisions):
        members = groups[name]
        out[d, 0] = KIND_CODES.get(members[0].kind, 0.0)
        out[d, 1] = float(sum(t.shape[0] for t in members))
        out[d, 2] = float(math.prod(members[0].shape[1:])) if len(members[0].shape) > 1 else 1.0
        out[d, 3] = float(sum(t.numel for t in members))
        if model is not None:
            flat = torch.cat([_weight(model, t.name).flatten().float() for t in members])
            out[d, 4] = float(flat.std()) if flat.numel() > 1 else float("nan")
            out[d, 5] = _kurtosis(flat)
    return out
