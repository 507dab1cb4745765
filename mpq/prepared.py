"""A model ready for the pipeline: loaded, its targets discovered, its costs read, and
optionally preconditioned.

:class:`Prepared` is what every command starts from (:func:`prepare`); :func:`task_for` builds
the :class:`~mpq.tasks.Task` of a step's data (:class:`~mpq.tasks.CalibSpec` names it, and plans
record it so an evaluation can reproduce it). :func:`precondition` / :func:`preconditioned`
return a new :class:`Prepared` with an equivalence transform of :mod:`mpq.precondition` applied
(its :class:`~mpq.precondition.PreconditionRecord` goes into every plan solved from it), and
:func:`prepared_for_plan` re-applies the transform a saved plan records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpq.cost import CostModel, build_cost_model
from mpq.errors import MpqError
from mpq.models import LoadedModel, load_model, sample_input
from mpq.plan import BitPlan
from mpq.precondition import (
    Preconditioned,
    PreconditionRecord,
    PreconditionSpec,
    precondition_model,
    record_of,
)
from mpq.targets import DEFAULT_TIE_RULES, Target, discover
from mpq.tasks import CalibSpec, Task


@dataclass
class Prepared:
    loaded: LoadedModel
    targets: list[Target]
    cost: CostModel
    # What mpq.precondition did to the fp model (recorded into every plan solved from it).
    precondition: PreconditionRecord = field(default_factory=PreconditionRecord)


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


def task_for(
    prep: Prepared,
    data_id: str,
    split: str,
    n: int | None,
    seq_len: int | None,
    batch_size: int | None,
    offset: int = 0,
) -> Task:
    return CalibSpec(data_id, split, n, seq_len, batch_size).task(prep.loaded, offset)


def precondition(
    prep: Prepared, spec: PreconditionSpec, calib: Task | Iterable[Any] | None = None
) -> tuple[Prepared, Preconditioned]:
    """A new :class:`Prepared` holding the transformed model, with the same targets
    and cost model (folding changes no shape or dtype). Its ``loaded.model_id`` gets a
    ``+<method>-<digest>`` tag so caches keyed by model id never mix the two models; plans keep
    the cost model's (original) id and should carry ``record`` in ``meta["precondition"]``."""
    res = precondition_model(prep.loaded.model, spec, calib, prep.targets)
    loaded = dataclasses.replace(prep.loaded, model=res.model)
    if spec.method != "none":
        loaded.model_id = f"{prep.loaded.model_id}+{spec.method}-{res.record.tag()}"
    return Prepared(loaded, list(prep.targets), prep.cost, res.record), res


def preconditioned(prep: Prepared, spec: Any, calib: CalibSpec) -> Prepared:
    """``prep`` with the equivalence transform ``spec`` (a
    :class:`~mpq.precondition.PreconditionSpec` or its text, e.g. ``"awq"``) applied, fitted on
    ``calib``; the record in ``precondition`` (copied into every plan solved from it) names the
    calibration data."""
    if isinstance(spec, str):
        spec = PreconditionSpec.parse(spec)
    if spec.method == "none":
        return prep
    new, _ = precondition(prep, spec, calib.task(prep.loaded))
    new.precondition = dataclasses.replace(new.precondition, calib_args=calib)
    return new


def prepared_for_plan(prep: Prepared, plan: BitPlan) -> Prepared:
    """The model ``plan`` was solved for: ``prep`` with the transform recorded in
    ``plan.meta["precondition"]`` re-applied on the recorded calibration data, checked to give
    the same scales (``scales_sha256``); ``prep`` itself when the plan records none."""
    rec = record_of(plan)
    if rec.method == "none":
        return prep
    if rec.calib_args is None:
        raise MpqError(
            f"the plan was solved on a {rec.method!r}-preconditioned model but does not "
            f"record its calibration data (calib_args); solve it again with this mpq version"
        )
    new = preconditioned(prep, rec.spec, rec.calib_args)
    want, got = rec.scales_sha256, new.precondition.scales_sha256
    if want != got:
        raise MpqError(
            f"re-running the plan's {rec.method!r} transform gave other scales "
            f"(sha256 {got} vs recorded {want}): the model, data or mpq version differ from "
            f"the ones the plan was solved with; solve the plan again"
        )
    return new
