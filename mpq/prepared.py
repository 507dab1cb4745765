"""A model ready for the pipeline: loaded, its targets discovered, its costs read; and the
calibration (or evaluation) data a step runs on.

:class:`Prepared` is what every command starts from (:func:`prepare`); :class:`CalibSpec` names
the data of one step (recorded in plans so an evaluation can reproduce it) and
:func:`task_for` builds its :class:`~mpq.tasks.Task`. Preconditioning a :class:`Prepared`
(:func:`mpq.precondition.preconditioned`) returns a new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mpq.cost import CostModel, build_cost_model
from mpq.models import LoadedModel, load_model, sample_input
from mpq.targets import DEFAULT_TIE_RULES, Target, discover
from mpq.tasks import Task, make_task


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


@dataclass(frozen=True)
class CalibSpec:
    """Which calibration data a step used (recorded in plans so an eval can reproduce it)."""

    data: str = "wiki"
    split: str = "calib"
    n: int | None = 2
    seq_len: int | None = 128
    batch_size: int | None = None
