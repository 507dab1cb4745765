"""Gradient estimators: the empirical Fisher, GWQ's gradient outliers, CPTQuant's Taylor terms.

All use the per-batch gradients ``g_b = dL_b/dW`` of the calibration batches
``b = 1..B`` (see :mod:`mpq.sensitivity.loss` for ``L_b``):

- the calibration gradient ``g = (1/B) sum_b g_b`` (the gradient of ``L``);
- the empirical Fisher diagonal ``F = (1/B) sum_b g_b * g_b``, **per batch**, not per sample:
  each calibration batch's mean-loss gradient is one sample of the Fisher (per-sample
  gradients would need one backward per window / image). It is the mean, not the sum, over
  batches so that ``F`` has the scale of a Hessian of ``L`` whatever the number of batches
  (Taylor's second-order term uses it as one). Make batches of one window for a per-window
  Fisher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.quant.quantize import fake_quantize
from mpq.sensitivity.base import (
    Context,
    EstimatorBase,
    TargetResult,
    choice,
    fits,
    positive,
)
from mpq.targets import Target


def gradient_moments(
    ctx: Context, params: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(g, F)`` per parameter: mean gradient and mean squared gradient over the batches."""
    gsum = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    fsum = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    n = ctx.calib.n_batches
    for _, grads in ctx.bar(ctx.calib.gradients(params), desc="gradients", total=n):
        for gs, fs, g in zip(gsum, fsum, grads, strict=True):
            gd = g.double()
            gs.add_(gd)
            fs.add_(gd * gd)
    return [g / n for g in gsum], [f / n for f in fsum]


def outlier_threshold(abs_grads: Sequence[torch.Tensor], q: float) -> float:
    """The smallest magnitude in the top ``q`` percent of all of ``abs_grads`` together."""
    flat = torch.cat([a.reshape(-1) for a in abs_grads])
    total = flat.numel()
    k = max(1, math.ceil(q / 100.0 * total))
    # the k-th largest = the (total - k + 1)-th smallest
    return float(torch.kthvalue(flat, total - k + 1).values)


@dataclass(frozen=True)
class Fisher(EstimatorBase):
    """Empirical Fisher per layer, and GWQ's gradient-outlier share.

    - ``fisher``: ``sum_i F_i`` over the layer's weights (module docstring: per-batch Fisher,
      mean over batches). Distortion: ``1/2 (sum F / n) ||dW||^2``, the Fisher standing in for
      the Hessian in HAWQ-V2's expected loss change.
    - ``outlier_share`` (GWQ: "Gradient-Aware Weight Quantization for Large
      Language Models"): the fraction of the layer's weights whose calibration-gradient
      magnitude ``|g_i|`` is in the top ``outlier_pct`` percent over **all targets of the run**
      (GWQ keeps the top 1% at fp16); weights with ``|g_i| = 0`` never count. Distortion:
      ``share * ||dW||^2`` (a nominal weight: GWQ ranks, it does not predict a loss).

    ``quantity`` picks which is the table's score (both are in its extras). Because the threshold
    is model-wide, the target set is part of the cache key and all targets compute together.
    """

    name: ClassVar[str] = "fisher"
    requires_grad: ClassVar[bool] = True
    needs_all_targets: ClassVar[bool] = True
    view_params: ClassVar[tuple[str, ...]] = ("quantity",)

    outlier_pct: float = 1.0
    quantity: str = "fisher"

    def __post_init__(self) -> None:
        positive(self.outlier_pct, "outlier_pct")
        if self.outlier_pct > 100:
            raise MpqError(f"outlier_pct={self.outlier_pct} must be at most 100")
        choice(self.quantity, ("fisher", "outlier_share"), "quantity")

    def label(self) -> str:
        return "fisher" if self.quantity == "fisher" else "gwq_outliers"

    def group_size(self) -> int | None:
        return None

    def score(self, result: TargetResult, target: Target) -> float:
        return float(result.values[self.quantity])

    def coefficient(self, result: TargetResult, target: Target) -> float:
        if self.quantity == "fisher":
            return 0.5 * result.values["fisher"] / target.numel
        return result.values["outlier_share"]

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        params = [ctx.weight(t) for t in targets]
        g, fisher = gradient_moments(ctx, params)
        abs_g = [x.abs() for x in g]
        thr = outlier_threshold(abs_g, self.outlier_pct)
        out = {}
        for t, a, f, gl in zip(targets, abs_g, fisher, g, strict=True):
            count = int(((a >= thr) & (a > 0)).sum())
            total = float(f.sum())
            out[t.name] = TargetResult(
                values={
                    "fisher": total,
                    "fisher_per_weight": total / t.numel,
                    "outlier_share": count / t.numel,
                    "outliers": float(count),
                    "grad_norm": float(gl.norm()),
                }
            )
        return out


def parse_score_format(spec: str) -> QuantFormat:
    fmt = QuantFormat.parse(spec)
    if fmt.keep:
        raise MpqError(f"score_format={spec!r} keeps the weight; give a quantized format, e.g. '4'")
    return fmt


@dataclass(frozen=True)
class Taylor(EstimatorBase):
    """CPTQuant TDMPQ ("CPTQuant - A Novel Mixed Precision Post-Training
    Quantization Techniques for Large Language Models"): Taylor terms of the loss change caused by
    each format's actual quantization error.

    For each candidate format, ``dW = Q_fmt(W) - W`` (round-to-nearest, exactly as the executor
    computes) and, with the calibration gradient ``g`` and empirical Fisher diagonal ``F`` (the
    module docstring), ``first = g . dW`` and ``second = 1/2 dW^T diag(F) dW``. The distortion is
    ``|first| + second`` (``order="both"``; the first-order term is taken in magnitude because
    its sign depends on where RTN happens to round, and at a converged model it is noise around
    zero), ``|first|`` (``"first"``) or ``second`` (``"second"``). The score is that distortion
    at ``score_format`` (default ``"4"``: 4-bit symmetric per channel); the extras hold the
    signed first-order term and the second-order term at it.
    """

    name: ClassVar[str] = "taylor"
    requires_grad: ClassVar[bool] = True
    per_format: ClassVar[bool] = True
    view_params: ClassVar[tuple[str, ...]] = ("order",)

    score_format: str = "4"
    order: str = "both"

    def __post_init__(self) -> None:
        parse_score_format(self.score_format)
        choice(self.order, ("both", "first", "second"), "order")

    def label(self) -> str:
        return "taylor" if self.order == "both" else f"taylor_{self.order}"

    def group_size(self) -> int | None:
        return None

    def distortion_row(self) -> str:
        return self.order

    def score(self, result: TargetResult, target: Target) -> float:
        return float(result.values[self.order])

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        sfmt = parse_score_format(self.score_format)
        for t in targets:
            if not fits(t, sfmt):
                raise MpqError(
                    f"score_format={self.score_format!r} does not fit {t.name!r} {t.shape}; "
                    f"choose a per-channel score format"
                )
        params = [ctx.weight(t) for t in targets]
        g, fisher = gradient_moments(ctx, params)
        out = {}
        for t, w, gl, fl in zip(targets, params, g, fisher, strict=True):
            rows: dict[str, dict[str, float]] = {"both": {}, "first": {}, "second": {}}
            fmts = {f.spec(): f for f in [*ctx.fitting_formats(t), sfmt] if not f.keep}
            signed = 0.0
            for spec, fmt in fmts.items():
                first, second = taylor_terms(w, fmt, gl, fl)
                rows["both"][spec] = abs(first) + second
                rows["first"][spec] = abs(first)
                rows["second"][spec] = second
                if spec == sfmt.spec():
                    signed = first
            s = sfmt.spec()
            out[t.name] = TargetResult(
                values={
                    "both": rows["both"][s],
                    "first": rows["first"][s],
                    "second": rows["second"][s],
                    "first_signed": signed,
                },
                distortions=rows,
            )
        return out


def taylor_terms(
    weight: torch.Tensor, fmt: QuantFormat, grad: torch.Tensor, fisher: torch.Tensor
) -> tuple[float, float]:
    """``(g . dW, 1/2 dW^T diag(F) dW)`` for ``dW = Q_fmt(W) - W``."""
    dw = fake_quantize(weight.detach(), fmt).double() - weight.detach().double()
    return float((grad.double() * dw).sum()), 0.5 * float((fisher.double() * dw * dw).sum())
