"""Hessian estimators from Hessian-vector products of the calibration loss.

Both work on the diagonal block ``H_ll`` of the Hessian of the calibration loss ``L`` (see
:mod:`mpq.sensitivity.loss`) with respect to one layer's weight ``W_l``.

- :class:`HessianEigen` (HAWQ: "Hessian AWare Quantization of Neural Networks
  with Mixed-Precision"): the dominant eigenvalue of ``H_ll`` by power iteration.
- :class:`HessianTrace` (HAWQ-V2: "Hessian Aware trace-Weighted Quantization";
  HAWQ-V3): ``tr(H_ll)`` by Hutchinson's estimator with Rademacher vectors.

HVPs differentiate twice through the model: transformers must use eager attention.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq.errors import MpqError
from mpq.sensitivity.base import Context, EstimatorBase, TargetResult, positive
from mpq.targets import Target


@dataclass(frozen=True)
class HessianEigen(EstimatorBase):
    """HAWQ: the dominant eigenvalue of each layer's Hessian block by power iteration.

    For each target, ``v`` starts as a seeded Gaussian vector on that layer's weight only and is
    iterated ``v <- H_ll v / ||H_ll v||``; the Rayleigh quotient ``lambda = v^T H_ll v`` stops
    when its relative change is below ``tol`` or after ``max_iter`` products. Power iteration
    finds the eigenvalue of **largest magnitude** (signed; it is the top eigenvalue of a PSD
    block). It converges slowly when two eigenvalues have nearly equal magnitude (and not at all
    if they are ``+-lambda``); ``converged`` in the table's extras says whether ``tol`` was met.

    Score: ``lambda``. Distortion: ``1/2 |lambda| ||dW||^2``, a bound on the second-order loss
    change. ``layers_per_pass`` layers iterate together, sharing each batch's forward and first
    backward (one more backward per layer); 1 keeps the cache per target.
    """

    name: ClassVar[str] = "hessian_eig"
    requires_grad: ClassVar[bool] = True
    requires_hvp: ClassVar[bool] = True

    tol: float = 1e-3
    max_iter: int = 100
    seed: int = 0
    layers_per_pass: int = 1

    def __post_init__(self) -> None:
        positive(self.tol, "tol")
        positive(self.max_iter, "max_iter")
        positive(self.layers_per_pass, "layers_per_pass")

    def group_size(self) -> int | None:
        return int(self.layers_per_pass)

    def coefficient(self, result: TargetResult, target: Target) -> float:
        return 0.5 * abs(self.score(result, target))

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        params = [ctx.weight(t) for t in targets]
        vs = []
        for t, p in zip(targets, params, strict=True):
            # Seeded per target: the result does not depend on which targets share the pass.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(t.name.encode()))
            v = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            vs.append(v / v.norm())
        lam: list[float | None] = [None] * len(targets)
        iters = [0] * len(targets)
        done = [False] * len(targets)
        for _ in ctx.bar(range(self.max_iter), desc="power iteration"):
            active = [j for j in range(len(targets)) if not done[j]]
            if not active:
                break
            hvs = ctx.calib.block_hvp([params[j] for j in active], [vs[j] for j in active])
            for j, hv in zip(active, hvs, strict=True):
                iters[j] += 1
                new = float((vs[j].double() * hv.double()).sum())
                norm = float(hv.double().norm())
                prev = lam[j]
                lam[j] = new
                if norm == 0.0:  # a zero block: every eigenvalue is 0
                    done[j] = True
                    continue
                vs[j] = hv / norm
                if prev is not None and abs(new - prev) <= self.tol * abs(new):
                    done[j] = True
        out = {}
        for j, t in enumerate(targets):
            value = lam[j]
            assert value is not None
            out[t.name] = TargetResult(
                values={
                    "score": value,
                    "eigenvalue": value,
                    "iterations": float(iters[j]),
                    "converged": float(done[j]),
                }
            )
        return out


def rademacher(shape: torch.Size, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randint(0, 2, tuple(shape), generator=gen) * 2 - 1).to(dtype)


@dataclass(frozen=True)
class HessianTrace(EstimatorBase):
    """HAWQ-V2/V3: each layer's Hessian block trace by Hutchinson's method.

    Each sample draws a Rademacher vector ``v`` over the weights of every target being computed
    and takes **one** full-model product ``H v`` (averaged over all calibration batches). Its
    layer-``l`` part gives ``v_l^T (H v)_l = v_l^T H_ll v_l + sum_{m != l} v_l^T H_lm v_m``,
    an unbiased estimate of ``tr(H_ll)`` (the cross terms have mean zero because the ``v_m``
    are independent), so one product serves every layer. Sampling stops once every layer's
    relative standard error ``se/|mean|`` is below ``tol`` (after at least ``min_samples``) or
    after ``max_samples``; ``se`` is reported as the table's stderr.

    Score: the block trace ``tr(H_ll)`` (the sum, not HAWQ-V2's average; the average
    ``tr/n`` is in the extras as ``trace_per_weight``). Distortion: HAWQ-V2's
    ``1/2 max(tr/n, 0) ||dW||^2``, the expected second-order loss change.

    All missing targets are computed together (cached per target afterwards); a resumed run
    estimates the missing targets only, with ``v`` supported on them.
    """

    name: ClassVar[str] = "hessian_trace"
    requires_grad: ClassVar[bool] = True
    requires_hvp: ClassVar[bool] = True

    tol: float = 0.05
    min_samples: int = 8
    max_samples: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        positive(self.tol, "tol")
        positive(self.min_samples, "min_samples")
        positive(self.max_samples, "max_samples")
        if self.min_samples < 2:
            raise MpqError("min_samples must be at least 2 to estimate a standard error")
        if self.max_samples < self.min_samples:
            raise MpqError(
                f"max_samples={self.max_samples} is below min_samples={self.min_samples}"
            )

    def group_size(self) -> int | None:
        return None

    def coefficient(self, result: TargetResult, target: Target) -> float:
        return 0.5 * max(self.score(result, target), 0.0) / target.numel

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        params = [ctx.weight(t) for t in targets]
        gen = torch.Generator().manual_seed(self.seed)
        s1 = torch.zeros(len(targets), dtype=torch.float64)
        s2 = torch.zeros(len(targets), dtype=torch.float64)
        n = 0
        for _ in ctx.bar(range(self.max_samples), desc="hutchinson"):
            vs = [rademacher(p.shape, gen, p.dtype) for p in params]
            hvs = ctx.calib.hvp(params, vs)
            x = torch.stack([(v.double() * h.double()).sum() for v, h in zip(vs, hvs, strict=True)])
            s1 += x
            s2 += x * x
            n += 1
            if n >= self.min_samples:
                mean, se = _mean_se(s1, s2, n)
                if bool((se <= self.tol * mean.abs()).all()):
                    break
        mean, se = _mean_se(s1, s2, n)
        out = {}
        for j, t in enumerate(targets):
            m, s = float(mean[j]), float(se[j])
            values = {"score": m, "trace": m, "trace_per_weight": m / t.numel, "samples": float(n)}
            if m != 0:
                values["rel_stderr"] = s / abs(m)
            out[t.name] = TargetResult(values=values, stderr={"score": s, "trace": s})
        return out


def _mean_se(s1: torch.Tensor, s2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the mean from running sums (unbiased variance)."""
    mean = s1 / n
    if n < 2:
        return mean, torch.zeros_like(mean)
    var = ((s2 - n * mean * mean) / (n - 1)).clamp_min(0.0)
    return mean, torch.sqrt(var / n)
