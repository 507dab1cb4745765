"""The one runner: any estimator, on any model and calibration task, cached per target.

:func:`run_estimator` validates the request (targets, kinds, calibration data, attention for
HVPs), prepares the model (eval mode; gradients only on the weights being differentiated;
everything restored afterwards), reads the per-target cache, hands the missing targets to the
estimator in groups of its ``group_size()`` (1 = one target at a time; None = all together),
writes each target's result as soon as its group is done, and assembles the
:class:`~mpq.sensitivity.table.SensitivityTable`.

Cache: ``<cache_root>/<digest of key>/<target>.json`` (:class:`~mpq.sensitivity.cache.TargetCache`),
key = estimator name and its computation parameters, model id, the sha256 of the model's state
dict, the calibration task's key and a sha256 of its batches, the code version, the candidate
formats (per-format estimators only) and the target set (estimators whose results depend on it).
A killed run resumes: per-target estimators recompute at most the target that was in progress.
An entry that is unreadable, of another key, edited by hand (its sha256 does not match), not
finite, or lacks the expected fields or formats is logged (logger ``mpq.cache``), ignored and
recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpq.cache import CODE_VERSION as EVAL_CODE_VERSION
from mpq.cache import data_fingerprint
from mpq.errors import MpqError
from mpq.evaluate import Reference
from mpq.formats import DATA_METHODS, QuantFormat
from mpq.layerstats import (
    InputStats,
    cached_input_stats,
    collect_input_stats,
    weighted_by_input,
)
from mpq.models import model_fingerprint
from mpq.quant.core import QUANT_VERSION
from mpq.quantstore import QuantStore
from mpq.registry import ESTIMATORS as REGISTRY
from mpq.sensitivity.base import Context, Estimator, TargetResult
from mpq.sensitivity.cache import TargetCache
from mpq.sensitivity.loss import Calibration, check_calibration, check_double_backward
from mpq.sensitivity.table import SensitivityTable
from mpq.targets import Target
from mpq.tasks import Task

log = logging.getLogger("mpq.sensitivity")

# 2: measured KL/Δloss in float64 with per-format standard errors (the estimator's noise floor).
# 3: checked entries (key digest + sha256), full-weight and data fingerprints in the key.
CACHE_VERSION = 3

# The estimator name table (name -> class, imported on use); re-exported for callers.
ESTIMATORS = REGISTRY


def make_estimator(name: str, params: Mapping[str, Any] | None = None) -> Estimator:
    """The estimator called ``name`` with ``params`` (strings are converted to the field types).

    ``make_estimator("hessian_trace", {"tol": "0.02"})``; unknown names and parameters are
    errors that list what exists.
    """
    cls = ESTIMATORS.load(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key not in fields:
            raise MpqError(
                f"estimator {name!r} has no parameter {key!r}; its parameters are "
                f"{sorted(fields) or 'none'}"
            )
        kwargs[key] = _convert(value, hints[key], f"{name}.{key}")
    est = cls(**kwargs)
    assert isinstance(est, Estimator)
    return est


def parse_params(items: Sequence[str]) -> dict[str, str]:
    """``["tol=0.02", "max_samples=100"]`` (or one comma-separated string) as a dict."""
    out: dict[str, str] = {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise MpqError(f"estimator parameter {part!r} must look like name=value")
            out[key.strip()] = value.strip()
    return out


def _convert(value: Any, typ: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
    except ValueError:
        raise MpqError(f"{what}={value!r} is not a valid {typ.__name__}") from None
    return value


def cache_key(
    estimator: Estimator,
    model_id: str,
    fingerprint: str,
    task: Task,
    formats: Sequence[QuantFormat],
    targets: Sequence[Target],
) -> dict[str, Any]:
    key: dict[str, Any] = {
        "cache_version": CACHE_VERSION,
        "quant_version": QUANT_VERSION,
        "estimator": estimator.name,
        "params": estimator.key_params(),
        "model": model_id,
        "weights": fingerprint,
        "task": task.key,
        "data": data_fingerprint(task.batches, task.labels),
        "code": EVAL_CODE_VERSION,
    }
    if estimator.per_format:
        key["formats"] = [f.spec() for f in formats]
    if estimator.needs_all_targets:
        names = "\n".join(t.name for t in targets)
        key["targets"] = hashlib.sha256(names.encode()).hexdigest()[:16]
    return key


class ResultCache(TargetCache):
    """The per-target cache with validated entries: a bad one is logged and recomputed."""

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        super().__init__(root, key)
        self.formats = key.get("formats")

    def _check(self, value: Any) -> str | None:
        try:
            result = TargetResult.from_json(value)
        except ValueError as exc:
            return str(exc)
        for metric, row in result.distortions.items():
            if self.formats is not None and sorted(row) != sorted(self.formats):
                return f"distortions[{metric!r}] has formats {sorted(row)}, not {self.formats}"
        if any(v < 0 for v in result.stderr.values()):
            return "a negative standard error"
        return None

    def load(self, name: str) -> TargetResult | None:
        value = self.get(name, self._check)
        return None if value is None else TargetResult.from_json(value)

    def store(self, name: str, result: TargetResult) -> None:
        self.put(name, result.to_json())


def _check_request(estimator: Estimator, model: nn.Module, targets: Sequence[Target]) -> None:
    if not targets:
        raise MpqError(
            "there are no targets to score (no Linear/Conv2d/Embedding weights selected); "
            "loosen --include/--exclude"
        )
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise MpqError("the targets repeat a name; pass each target once")
    bad = [t for t in targets if t.kind not in estimator.kinds]
    if bad:
        kinds = sorted({t.kind for t in bad})
        raise MpqError(
            f"estimator {estimator.name!r} does not support {'/'.join(kinds)} layers "
            f"({', '.join(t.name for t in bad[:3])}{' ...' if len(bad) > 3 else ''}); it "
            f"supports {sorted(estimator.kinds)}: exclude them (e.g. --exclude "
            f"'{bad[0].name.split('.')[-1]}')"
        )
    for t in targets:
        w = getattr(model.get_submodule(t.name), "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise MpqError(
                f"target {t.name!r} has no floating-point weight to score (already quantized?); "
                f"score the fp model"
            )
    if estimator.requires_hvp:
        check_double_backward(model)


@contextmanager
def _prepared(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _groups(items: list[Target], size: int | None) -> list[list[Target]]:
    if not items:
        return []
    if size is None:
        return [items]
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]


def run_estimator(
    estimator: Estimator,
    model: nn.Module,
    targets: Sequence[Target],
    task: Task,
    *,
    model_id: str,
    formats: Sequence[QuantFormat] = (),
    cache_root: Path | None = None,
    progress: bool = True,
    on_target: Callable[[str], None] | None = None,
    reference: Reference | None = None,
    stats_task: Task | None = None,
) -> SensitivityTable:
    """Run ``estimator`` on ``targets`` of ``model`` with the calibration ``task``.

    ``formats``: candidate formats the table gets distortions for (keep formats are skipped;
    formats a target cannot store are left out of its row, as the problem builder expects).
    ``cache_root``: folder of the per-target cache (None: no cache). ``on_target(name)`` is
    called after each newly computed target is written (progress hooks, the resume tests).
    ``reference``: the fp reference of ``task`` if already computed (measured damage).
    ``stats_task``: the calibration windows the input statistics of ``mse`` / ``gptq`` formats
    come from (default: ``task``); part of the cache key.
    """
    targets = list(targets)
    _check_request(estimator, model, targets)
    check_calibration(task)
    data_fmts = [f for f in formats if not f.keep and f.method in DATA_METHODS]
    if data_fmts and estimator.name != "measured":
        raise MpqError(
            f"estimator {estimator.name!r} scores round-to-nearest error; formats "
            f"{[f.spec() for f in data_fmts]} use calibration statistics: use the measured "
            f"estimator, or score their rtn equivalents (drop ':mse'/':gptq') and solve with those"
        )
    fmts: list[QuantFormat] = []
    for f in formats:
        if not f.keep and f.spec() not in {g.spec() for g in fmts}:
            fmts.append(f)
    stats: dict[str, InputStats] = {}
    linear = [t.name for t in targets if weighted_by_input(t)]  # Linear layers, tied embeddings
    stats_from = task if stats_task is None else stats_task
    wants = estimator.uses_input_stats()
    if (data_fmts or wants) and linear:  # importance / Hessians from the fp model
        gptq = wants or any(f.method == "gptq" for f in data_fmts)
        full = [t.name for t in targets if gptq and t.kind == "linear"]
        if cache_root is not None:
            stats = cached_input_stats(
                model, linear, stats_from, model_id=model_id,
                cache_root=Path(cache_root).parent / "stats", full=full, progress=progress,
            )  # fmt: skip
        else:
            stats = collect_input_stats(
                model, linear, stats_from.batches, full=full, progress=progress
            )
    fingerprint = model_fingerprint(model) if cache_root is not None else ""
    ctx = Context(
        model=model,
        task=task,
        calib=Calibration(task, model),
        formats=tuple(fmts),
        progress=progress,
        _reference=reference,
        stats=stats,
        # what the table quantizes, the evaluator and later runs read back (mpq.quantstore)
        quant_store=None
        if cache_root is None
        else QuantStore.open(
            Path(cache_root).parent / "quant", model_id, fingerprint, stats, keep=False
        ),
    )
    cache = None
    if cache_root is not None:
        key = cache_key(estimator, model_id, fingerprint, task, fmts, targets)
        if data_fmts or wants:  # the statistics' windows decide mse / gptq and anchored entries
            key["stats"] = [stats_from.key, data_fingerprint(stats_from.batches, None)]
        cache = ResultCache(Path(cache_root), key)
    results: dict[str, TargetResult] = {}
    if cache is not None:
        for t in targets:
            hit = cache.load(t.name)
            if hit is not None:
                results[t.name] = hit
    missing = [t for t in targets if t.name not in results]
    if missing and estimator.needs_all_targets:
        missing = targets
    if missing:
        with _prepared(model):
            bar = tqdm(
                total=len(missing), desc=estimator.label(), disable=not progress, unit="layer"
            )
            try:
                for group in _groups(missing, estimator.group_size()):
                    weights = [ctx.weight(t) for t in group]
                    if estimator.requires_grad:
                        for w in weights:
                            w.requires_grad_(True)
                    try:
                        out = estimator.compute(ctx, group)
                    finally:
                        for w in weights:
                            w.requires_grad_(False)
                    for t in group:
                        if t.name not in out:
                            raise RuntimeError(f"{estimator.name} returned no result for {t.name}")
                        results[t.name] = out[t.name]
                        if cache is not None:
                            cache.store(t.name, out[t.name])
                        bar.update(1)
                        if on_target is not None:
                            on_target(t.name)
            finally:
                bar.close()
    return build_table(estimator, model, targets, results, task, fmts, model_id)


def build_table(
    estimator: Estimator,
    model: nn.Module,
    targets: Sequence[Target],
    results: Mapping[str, TargetResult],
    task: Task,
    formats: Sequence[QuantFormat],
    model_id: str,
) -> SensitivityTable:
    """Scores, standard errors and distortions of every target (the distortion model)."""
    scores: dict[str, float] = {}
    stderr: dict[str, float] = {}
    distortions: dict[str, dict[str, float]] = {}
    distortion_se: dict[str, dict[str, float]] = {}
    for t in targets:
        r = results[t.name]
        scores[t.name] = estimator.score(r, t)
        se = estimator.score_stderr(r, t)
        if se is not None and math.isfinite(se):
            stderr[t.name] = se
        weight = model.get_submodule(t.name).weight
        assert isinstance(weight, torch.Tensor)
        distortions[t.name] = estimator.distortions(r, t, weight, formats)
        se_row = estimator.distortion_stderr(r, t, formats)
        if se_row:
            distortion_se[t.name] = se_row
    params = {
        **estimator.params(),
        "formats": [f.spec() for f in formats],
        "task": task.key,
        "extras": {t.name: dict(results[t.name].values) for t in targets},
    }
    return SensitivityTable(
        estimator=estimator.label(),
        model_id=model_id,
        data_id=task.key,
        distortions=distortions,
        scores=scores,
        stderr=stderr,
        distortion_se=distortion_se,
        params=params,
    )
