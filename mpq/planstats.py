"""Which calibration statistics a plan's ``mse`` / ``gptq`` formats were computed with.

A format's spec says the method (``4:g32:mse``); the plan says the data. When a plan with such
formats is solved on calibration data, ``plan.meta["stats"]`` records that task (data, split,
windows, tokens, offset and its key); whoever applies the plan later (the evaluator, export)
rebuilds the same task and reads the same statistics (:func:`mpq.layerstats.
cached_input_stats`, cached on disk). Without a record, ``mse`` minimizes the unweighted error
and ``gptq`` is refused (it cannot run without a Hessian). The record is part of the plan's
digest, so weighted and unweighted evaluations never share a cache entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mpq.errors import MpqError
from mpq.formats import DATA_METHODS
from mpq.layerstats import InputStats, cached_input_stats
from mpq.models import LoadedModel, cache_root
from mpq.plan import BitPlan
from mpq.targets import Target
from mpq.tasks import Task, make_task

META_KEY = "stats"


def uses_stats(plan: BitPlan) -> bool:
    """Whether any format of ``plan`` uses input statistics (mse, gptq)."""
    return any(not f.keep and f.method in DATA_METHODS for f in plan.formats.values())


def task_record(task: Task) -> dict[str, Any]:
    """What rebuilds ``task`` (a language-model or encoder task of windows)."""
    first = task.batches[0]
    ids = first["input_ids"] if isinstance(first, dict) else first
    units = sum(int((b["input_ids"] if isinstance(b, dict) else b).shape[0]) for b in task.batches)
    return {
        "data": task.data_id,
        "split": task.split,
        "n": units,
        "seq_len": int(ids.shape[-1]),
        "offset": task.offset,
        "key": task.key,
    }


def with_record(plan: BitPlan, task: Task | None) -> BitPlan:
    """``plan`` with ``meta["stats"]`` naming ``task`` when it uses statistics (else as is)."""
    if task is None or not uses_stats(plan):
        return plan
    return dataclasses.replace(plan, meta={**plan.meta, META_KEY: task_record(task)})


def digest_part(plan: BitPlan) -> str:
    """The statistics' task key for plans that use statistics ('' otherwise)."""
    rec = plan.meta.get(META_KEY)
    if not uses_stats(plan) or not isinstance(rec, dict):
        return ""
    return str(rec.get("key", ""))


def plan_stats(
    loaded: LoadedModel, targets: Sequence[Target], plan: BitPlan
) -> dict[str, InputStats] | None:
    """The statistics ``plan`` records (rebuilt, cached), or None when it records none."""
    from mpq.executor import data_targets

    rec = plan.meta.get(META_KEY)
    if not uses_stats(plan) or rec is None:
        return None
    if not isinstance(rec, dict) or not {"data", "split", "n", "seq_len"} <= set(rec):
        raise MpqError(
            f"plan meta {META_KEY!r} is malformed ({rec!r}); solve the plan again or remove it"
        )
    task = make_task(
        loaded, rec["data"], rec["split"], int(rec["n"]), int(rec["seq_len"]), None,
        int(rec.get("offset", 0)),
    )  # fmt: skip
    if "key" in rec and task.key != rec["key"]:
        raise MpqError(
            f"the plan's statistics data {rec['key']!r} rebuilt as {task.key!r}: the data or "
            f"tokenizer differ from the ones the plan was solved with; solve it again"
        )
    names, full = data_targets(plan, targets)
    return cached_input_stats(
        loaded.model, names, task, model_id=loaded.model_id, cache_root=cache_root() / "stats",
        full=full,
    )  # fmt: skip
