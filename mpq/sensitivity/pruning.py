"""CPTQuant PMPQ: a layer's sensitivity to sparsity.

("CPTQuant - A Novel Mixed Precision Post-Training Quantization Techniques
for Large Language Models".) For each target alone, the ``ceil(p * n)`` weights of smallest
magnitude (ties broken by position) are set to zero and the calibration loss is measured
(:mod:`mpq.sensitivity.loss`); the score is ``L(pruned) - L(fp)``. Default ``p = 0.5`` (50%
sparsity, the unstructured level at which layers separate clearly). The weight is restored
exactly afterwards.

Distortion: ``max(dL, 0) * ||dW_fmt||^2 / ||dW_prune||^2``, i.e. the measured loss change per
unit of squared weight perturbation (``dW_prune`` = the zeroed weights), scaled to each format's
quantization error as a second-order (quadratic) model would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq.errors import MpqError
from mpq.sensitivity.base import Context, EstimatorBase, TargetResult
from mpq.targets import Target


def prune_smallest(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """A copy of ``weight`` with its ``ceil(fraction * n)`` smallest-magnitude entries zeroed."""
    flat = weight.detach().reshape(-1)
    k = math.ceil(fraction * flat.numel())
    order = torch.argsort(flat.abs(), stable=True)
    out = flat.clone()
    out[order[:k]] = 0
    return out.reshape(weight.shape)


@dataclass(frozen=True)
class Pruning(EstimatorBase):
    """CPTQuant PMPQ: calibration-loss change when a layer's smallest ``p`` are zeroed."""

    name: ClassVar[str] = "pruning"

    p: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0 < self.p < 1:
            raise MpqError(f"p={self.p!r} must be a fraction strictly between 0 and 1")

    def coefficient(self, result: TargetResult, target: Target) -> float:
        norm = result.values["pruned_sq_norm"]
        return max(result.values["score"], 0.0) / norm if norm > 0 else 0.0

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        base = ctx.calib.base_loss()
        out = {}
        for t in targets:
            weight = ctx.weight(t)
            original = weight.detach().clone()
            pruned = prune_smallest(original, self.p)
            try:
                with torch.no_grad():
                    weight.copy_(pruned)
                loss = ctx.calib.mean_loss()
            finally:
                with torch.no_grad():
                    weight.copy_(original)
            delta = loss - base
            out[t.name] = TargetResult(
                values={
                    "score": delta,
                    "delta_loss": delta,
                    "pruned_sq_norm": float((original.double() - pruned.double()).pow(2).sum()),
                }
            )
        return out
