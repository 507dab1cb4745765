"""CPTQuant CMPQ: canonical correlation between a layer's fp and quantized outputs.

("CPTQuant - A Novel Mixed Precision Post-Training Quantization Techniques
for Large Language Models".) The paper correlates layer activations by canonical correlation
analysis; here the two views are the layer's **fp output** and its **quantized output** on the
same fp inputs, so the score measures how much of the output's structure survives
quantization of that layer alone.

For one target (``Linear`` or ``Conv2d``): its inputs ``X`` are recorded on the fp model over
the calibration batches (every call of the module), ``Y = f(X; W)`` and ``Y_q = f(X; Q(W))``
are computed in float64 with the module's own function (bias included), and every token (a
position of a text window, a pixel of a feature map) is a row. At most ``max_tokens`` evenly
spaced rows are kept. Both outputs are projected on the top
``k = min(d_out, max_dims, tokens // 4)`` principal directions of the centred fp output
(SVCCA-style: the sample CCA of ``d`` dimensions on fewer than a few ``d`` tokens is trivially
1), and :func:`cca` gives their canonical correlations ``rho_1..rho_k``. The distortion of a
format is ``1 - mean(rho)``; the score is the distortion at ``score_format``. ``reg`` is a
ridge on both views (default 0: rank deficiency is handled by truncation, and a ridge would
bias ``1 - rho`` by about ``reg``, which is the size of 8-bit damage).

Embeddings are not supported (a lookup has no input activations to correlate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mpq.errors import MpqError
from mpq.quant.quantize import fake_quantize
from mpq.sensitivity.base import (
    MATMUL_KINDS,
    Context,
    EstimatorBase,
    TargetResult,
    fits,
    positive,
)
from mpq.sensitivity.gradient import parse_score_format
from mpq.targets import Target


def cca(
    x: torch.Tensor, y: torch.Tensor, reg: float = 0.0, rank_tol: float = 1e-10
) -> torch.Tensor:
    """Canonical correlations of the columns of ``x`` ``[n, p]`` and ``y`` ``[n, q]``, descending.

    Rows are samples. Björck-Golub: centre each view, take its thin SVD ``U S V^T`` and drop the
    directions with ``s <= rank_tol * s_max`` (rank deficiency: collinear or constant columns
    add nothing instead of breaking a matrix inverse); the canonical correlations are the
    singular values of ``U_x^T U_y``. ``reg > 0`` is ridge CCA, ``C_xx + lambda I`` with
    ``lambda = reg * mean(s^2)`` per view, computed as the singular values of
    ``(U_x D_x)^T (U_y D_y)`` with ``D = s / sqrt(s^2 + lambda)``. Computed in float64; returns
    ``min(rank_x, rank_y)`` values in ``[0, 1]`` (empty when a view is constant).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise MpqError(f"cca needs [n, p] and [n, q] with equal n, got {x.shape} and {y.shape}")
    if x.shape[0] < 2:
        raise MpqError("cca needs at least 2 samples")
    bx = _basis(x, reg, rank_tol)
    by = _basis(y, reg, rank_tol)
    if bx.shape[1] == 0 or by.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    rho = torch.linalg.svdvals(bx.T @ by)
    return rho.clamp(0.0, 1.0)


def _basis(a: torch.Tensor, reg: float, rank_tol: float) -> torch.Tensor:
    a = a.double()
    a = a - a.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    keep = s > rank_tol * s[0]
    u, s = u[:, keep], s[keep]
    if reg > 0:
        lam = reg * float((s * s).mean())
        u = u * (s / torch.sqrt(s * s + lam))
    return u


def _forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's output for input ``x`` with ``weight`` as float64 rows ``[tokens, channels]``.

    float64, because ``1 - rho`` of a mildly quantized layer is far below float32's resolution.
    """
    x, weight = x.double(), weight.double()
    bias = getattr(module, "bias", None)
    bias = bias.detach().double() if isinstance(bias, torch.Tensor) else None
    if isinstance(module, nn.Linear):
        y = F.linear(x, weight, bias)
        return y.reshape(-1, y.shape[-1])
    if isinstance(module, nn.Conv2d):
        y = module._conv_forward(x, weight, bias)
        return y.movedim(1, -1).reshape(-1, y.shape[1])
    raise MpqError(f"correlation supports Linear and Conv2d layers, not {type(module).__name__}")


def record_inputs(ctx: Context, module: nn.Module) -> list[torch.Tensor]:
    """Every input the module receives over the calibration batches (fp model, no grad)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())

    handle = module.register_forward_pre_hook(hook)
    try:
        ctx.calib.forward_all()
    finally:
        handle.remove()
    return seen


@dataclass(frozen=True)
class Correlation(EstimatorBase):
    """CPTQuant CMPQ: ``1 - mean canonical correlation`` of fp vs quantized layer outputs.

    See the module docstring for the exact computation and its parameters.
    """

    name: ClassVar[str] = "correlation"
    kinds: ClassVar[frozenset[str]] = MATMUL_KINDS
    per_format: ClassVar[bool] = True
    distortion_metric: ClassVar[str] = "cca"

    score_format: str = "4"
    max_dims: int = 64
    max_tokens: int = 4096
    reg: float = 0.0

    def __post_init__(self) -> None:
        parse_score_format(self.score_format)
        positive(self.max_dims, "max_dims")
        positive(self.max_tokens, "max_tokens")
        positive(self.reg, "reg", allow_zero=True)

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        sfmt = parse_score_format(self.score_format)
        out = {}
        for t in targets:
            if not fits(t, sfmt):
                raise MpqError(
                    f"score_format={self.score_format!r} does not fit {t.name!r} {t.shape}"
                )
            module = ctx.module(t)
            weight = ctx.weight(t).detach()
            inputs = record_inputs(ctx, module)
            if not inputs:
                raise MpqError(f"{t.name!r} is never called on the calibration data; exclude it")
            fmts = {f.spec(): f for f in [*ctx.fitting_formats(t), sfmt] if not f.keep}
            with torch.no_grad():
                y = torch.cat([_forward(module, x, weight) for x in inputs])
                rows = _subsample(y.shape[0], self.max_tokens)
                y = y[rows]
                n, d = y.shape
                k = min(d, self.max_dims, n // 4)
                if k < 1:
                    raise MpqError(
                        f"{t.name!r}: {n} calibration tokens are too few for canonical "
                        f"correlation (need at least 4); give more calibration data"
                    )
                mean = y.mean(0, keepdim=True)
                _, _, vh = torch.linalg.svd(y - mean, full_matrices=False)
                proj = vh[:k].T
                a = (y - mean) @ proj
                row: dict[str, float] = {}
                for spec, fmt in fmts.items():
                    wq = fake_quantize(weight, fmt)
                    yq = torch.cat([_forward(module, x, wq) for x in inputs])[rows]
                    rho = cca(a, (yq - yq.mean(0, keepdim=True)) @ proj, self.reg)
                    row[spec] = float(1.0 - rho.mean()) if rho.numel() else 0.0
            out[t.name] = TargetResult(
                values={"score": row[sfmt.spec()], "dims": float(k), "tokens": float(n)},
                distortions={"cca": row},
            )
        return out


def _subsample(n: int, limit: int) -> torch.Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.linspace(0, n - 1, limit).round().long()
