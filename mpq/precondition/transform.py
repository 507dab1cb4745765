"""The transform: a preconditioned deep copy of a model, with its fold report and record."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mpq.errors import MpqError
from mpq.precondition.record import PreconditionRecord
from mpq.precondition.rules import FoldedEntry, FoldReport, plan_folds
from mpq.precondition.scales import awq_scales, fold_scales, sf_scales
from mpq.precondition.spec import PreconditionSpec
from mpq.precondition.stats import collect_stats
from mpq.targets import Target
from mpq.tasks import Task

#: AWQ's search needs at least this many calibration tokens (rows of X): below it the
#: per-channel means and the Gram matrix are too noisy to pick scales (the AWQ paper uses 65k).
MIN_AWQ_TOKENS = 256
#: Scale folding reads per-channel maxima; it needs at least this many calibration tokens.
MIN_SF_TOKENS = 16


@dataclass(frozen=True)
class Preconditioned:
    """The transformed copy, what was folded where, and the record for a plan's meta."""

    model: nn.Module
    spec: PreconditionSpec
    report: FoldReport
    record: PreconditionRecord = field(default_factory=PreconditionRecord)


def _calib_info(calib: Any, tokens: int) -> dict[str, Any]:
    info: dict[str, Any] = {"tokens": tokens}
    for attr in ("data_id", "split", "key"):
        if hasattr(calib, attr):
            info[attr] = getattr(calib, attr)
    return info


def precondition_model(
    model: nn.Module,
    spec: PreconditionSpec,
    calib: Task | Iterable[Any] | None = None,
    targets: Sequence[Target] | None = None,
) -> Preconditioned:
    """A transformed deep copy of ``model`` (``model`` is untouched) with ``spec`` applied.

    ``calib`` (a :class:`mpq.tasks.Task` or batches of model inputs) is needed by
    ``scale_folding`` (at least ``MIN_SF_TOKENS`` tokens) and ``awq`` (at least
    ``MIN_AWQ_TOKENS``). ``targets`` limits folding to groups holding a target; layers left out
    are reported. Raises :class:`MpqError` for an architecture with nowhere to fold.
    """
    t0 = time.perf_counter()
    out = copy.deepcopy(model)
    if spec.method == "none":
        report = FoldReport((), (), time.perf_counter() - t0)
        record = PreconditionRecord(spec, report=json.loads(json.dumps(report.to_dict())))
        return Preconditioned(out, spec, report, record)
    folds, not_folded = plan_folds(model, targets, spec.groups)
    if calib is None:
        raise MpqError(
            f"precondition {spec.method!r} needs calibration data (a Task or batches of inputs)"
        )
    stats = collect_stats(model, folds, calib, gram=spec.method == "awq")
    tokens = min((s.tokens for s in stats.values()), default=0)
    need = MIN_AWQ_TOKENS if spec.method == "awq" else MIN_SF_TOKENS
    if tokens < need:
        raise MpqError(
            f"precondition {spec.method!r} got {tokens} calibration tokens; it needs at least "
            f"{need} (e.g. 1 window of {need} tokens): give more calibration windows"
        )
    folded: list[FoldedEntry] = []
    digest = hashlib.sha256()
    for g in folds:
        st = stats[g.layers[0]]
        if spec.method == "scale_folding":
            s, entry = sf_scales(out, g, st, spec)
        else:
            res = awq_scales(out, g, st, spec)
            if res is None:
                for n in g.layers:
                    not_folded.append((n, "every layer of its group is kept at 16 bits"))
                continue
            s, entry = res
        fold_scales(out, g, s)
        folded.append(entry)
        digest.update(s.float().numpy().tobytes())
    report = FoldReport(tuple(folded), tuple(not_folded), time.perf_counter() - t0)
    record = PreconditionRecord(
        spec,
        calib=json.loads(json.dumps(_calib_info(calib, tokens))),
        scales_sha256=digest.hexdigest()[:16],
        not_folded=tuple((str(a), str(b)) for a, b in not_folded),
    )
    return Preconditioned(out, spec, report, record)
