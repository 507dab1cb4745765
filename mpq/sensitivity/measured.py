"""Measured damage (ZeroQ, MixDQ): quantize one target alone, measure what the output lost.

(ZeroQ, "A Novel Zero Shot Quantization Framework": the KL divergence of the outputs when one
layer is quantized; MixDQ, "Memory-Efficient Few-Step Text-to-Image Diffusion Models with
Metric-Decoupled Mixed Precision Quantization": per-layer sensitivity measured on the outputs,
one metric per concern.) For every target and candidate format, the target's
weight is fake-quantized in place, the model is run on the calibration batches, and

- ``kl``: the mean KL(fp || quantized) of the output distributions (the same number as
  :func:`mpq.evaluate.evaluate`'s ``kl``), and
- ``loss``: the change of the calibration loss (:mod:`mpq.sensitivity.loss`: cross-entropy
  against the labels, or the fp model's pseudo-labels)

are recorded; the weight is restored exactly afterwards. ``metric`` picks which one is the
table's distortion (both are cached together, so switching is free); the table clamps
negative values to 0 and its score is the largest distortion over the formats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from mpq.evaluate import Reference, batch_stats, evaluate
from mpq.formats import QuantFormat
from mpq.quantize import fake_quantize
from mpq.sensitivity.base import Context, EstimatorBase, TargetResult, choice
from mpq.sensitivity.loss import logits_loss
from mpq.sensitivity.table import SensitivityTable
from mpq.targets import Target
from mpq.tasks import Task

ESTIMATOR = "measured_kl"


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (float64); one unit has no spread, so its se is 0."""
    x = values.double().flatten()
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else 0.0
    return float(x.mean()), se


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


@dataclass(frozen=True)
class Measured(EstimatorBase):
    """ZeroQ / MixDQ measured damage: ΔKL and Δloss with only one target quantized."""

    name: ClassVar[str] = "measured"
    per_format: ClassVar[bool] = True
    view_params: ClassVar[tuple[str, ...]] = ("metric",)

    metric: str = "kl"

    def __post_init__(self) -> None:
        choice(self.metric, ("kl", "loss"), "metric")

    def label(self) -> str:
        return f"measured_{self.metric}"

    def distortion_row(self) -> str:
        return self.metric

    def score(self, result: TargetResult, target: Target) -> float:
        row = result.distortions.get(self.metric, {})
        return max([max(v, 0.0) for v in row.values()], default=0.0)

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        ref = ctx.reference()
        labels = ctx.calib.labels()
        base = ctx.calib.base_loss()
        out = {}
        for t in targets:
            weight = ctx.weight(t)
            original = weight.detach().clone()
            kl: dict[str, float] = {}
            dloss: dict[str, float] = {}
            kl_se: dict[str, float] = {}
            loss_se: dict[str, float] = {}
            try:
                with torch.no_grad():
                    for fmt in ctx.fitting_formats(t):
                        weight.copy_(fake_quantize(original, fmt))
                        kls, losses = [], []
                        for i, batch in enumerate(ctx.task.batches):
                            logits = ctx.task.head(ctx.model, batch)
                            kls.append(batch_stats(logits, ref.logits[i], None).kl)
                            losses.append(float(logits_loss(logits, labels[i], i)))
                        spec = fmt.spec()
                        kl[spec], kl_se[spec] = _mean_se(torch.cat(kls))
                        losses_t = torch.tensor(losses, dtype=torch.float64)
                        mean_loss, loss_se[spec] = _mean_se(losses_t)
                        dloss[spec] = mean_loss - base
            finally:
                with torch.no_grad():
                    weight.copy_(original)
            rows = {"kl": kl, "loss": dloss, "kl_se": kl_se, "loss_se": loss_se}
            out[t.name] = TargetResult(values={}, distortions=rows)
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
    metric: str = "kl",
) -> SensitivityTable:
    """Per-(target, format) KL (or Δloss) damage, cached per target under ``cache_root``.

    A thin wrapper over :func:`mpq.sensitivity.runner.run_estimator` with :class:`Measured`.
    ``on_target(name)`` is called after each newly computed target (used by the resume test).
    """
    from mpq.sensitivity.runner import run_estimator

    return run_estimator(
        Measured(metric=metric),
        model,
        targets,
        task,
        model_id=model_id,
        formats=formats,
        cache_root=cache_root,
        progress=progress,
        on_target=on_target,
        reference=ref,
    )
