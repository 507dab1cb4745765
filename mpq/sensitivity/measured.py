"""Measured damage (ZeroQ, MixDQ): quantize one target alone, measure what the output lost.

For every target and candidate format, the target's weight is fake-quantized in place, the
model is run on the calibration batches, and the mean KL(fp || quantized) of the outputs is the
distortion of that (target, format). The weight is restored exactly afterwards. Results are
cached per target, so a killed run resumes with at most the interrupted target recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mpq.evaluate import Reference, evaluate
from mpq.formats import QuantFormat
from mpq.quantize import check_format, fake_quantize
from mpq.sensitivity.cache import TargetCache
from mpq.sensitivity.table import SensitivityTable
from mpq.targets import Target
from mpq.tasks import Task

ESTIMATOR = "measured_kl"


def measure_target(
    model: nn.Module, target: Target, formats: Sequence[QuantFormat], task: Task, ref: Reference
) -> dict[str, float]:
    """KL of the model's outputs when only ``target`` is quantized, per format spec."""
    weight = model.get_submodule(target.name).weight
    assert isinstance(weight, torch.Tensor)
    original = weight.detach().clone()
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            for fmt in formats:
                weight.copy_(fake_quantize(original, fmt))
                out[fmt.spec()] = max(evaluate(task, model, ref)["kl"], 0.0)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    return out


def measured_damage(
    model: nn.Module,
    targets: Sequence[Target],
    formats: Sequence[QuantFormat],
    task: Task,
    ref: Reference,
    *,
    model_id: str,
    cache_root: Path | None = None,
    progress: bool = True,
    on_target: Callable[[str], None] | None = None,
) -> SensitivityTable:
    """Per-(target, format) KL damage, cached per target under ``cache_root`` when given.

    ``on_target(name)`` is called after each newly computed target (used by the resume test).
    """
    formats = [f for f in formats if not f.keep]
    params = {"formats": [f.spec() for f in formats], "task": task.key}
    cache = (
        TargetCache(cache_root, {"estimator": ESTIMATOR, "model": model_id, **params})
        if cache_root is not None
        else None
    )
    distortions: dict[str, dict[str, float]] = {}
    for t in tqdm(targets, desc="measured damage", disable=not progress):
        usable = [f for f in formats if _fits(t, f)]
        hit = cache.get(t.name) if cache is not None else None
        if hit is None:
            hit = measure_target(model, t, usable, task, ref)
            if cache is not None:
                cache.put(t.name, hit)
            if on_target is not None:
                on_target(t.name)
        distortions[t.name] = hit
    scores = {n: max(d.values()) if d else 0.0 for n, d in distortions.items()}
    return SensitivityTable(
        estimator=ESTIMATOR,
        model_id=model_id,
        data_id=task.key,
        distortions=distortions,
        scores=scores,
        params=params,
    )


def _fits(target: Target, fmt: QuantFormat) -> bool:
    try:
        check_format(target.shape, fmt)
    except ValueError:
        return False
    return True
