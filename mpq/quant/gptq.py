"""GPTQ (Frantar et al., 2023) as a pure function: weight + input Hessian + format -> codes.

``gptq_quantize(W, H, fmt)`` quantizes the columns of ``W [rows, cols]`` one at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian ``H = E[x x^T]`` of the layer inputs, so that ``||X W^T - X Q^T||`` (not ``||W - Q||``)
is small. The usual details:

- **damping**: ``H += damp * mean(diag H) * I`` (``damp=0.01``); columns whose input is always
  zero (``H_jj = 0``) get ``H_jj = 1`` and a zero weight.
- **blocking**: columns are processed in blocks of ``block_size`` (rounded to whole groups); the
  error of a block is pushed to later columns with one matrix product (the "lazy batch" update).
- **grids** (``grid="mse"``, the default): the ``mse`` search (:mod:`mpq.quant.mse`) weighted
  per column by the Hessian's diagonal (the importance); ``grid="rtn"``: the round-to-nearest
  min/max rule (:mod:`mpq.quant.rtn`). Scales are rounded to the scale dtype first; any code
  grid (``int``, ``nl``, ``nf4``). On SmolLM2 (35 layers, Hessians from wiki calib, scored under
  an independent bbc-calib Hessian) the mse grid cuts GPTQ's output error to 0.39x rtn's at
  4:g32, against 0.50x with the rtn grid (``experiments/bench/bench_gptq_layers.py``).
  Per channel: from the whole original row. Grouped:
  from the group's columns *as updated by GPTQ*, when the first column of the group is reached.
- **activation order** (``act_order=True``): columns are visited by decreasing ``H_jj``. The
  stored format has no column permutation, so the result is un-permuted: codes go back to their
  original columns and every group keeps its original, contiguous columns. To keep that
  expressible, act-order grids are **static**: computed before the pass from the original
  weight (per channel: the row; grouped: each group's original columns), as in AutoGPTQ's
  ``static_groups``. Nothing extra is stored, and the packed result is an ordinary format.

The result is a :class:`~mpq.quant.quantize.QuantizedTensor` whose codes, scales and zero-points are
exactly what :class:`~mpq.kernels.modules.PackedWeight` stores; its dequantization is the GPTQ
weight (a test checks pack -> unpack -> dequantize).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.errors import MpqError
from mpq.formats import QuantFormat, check_format, matrix_shape, n_groups
from mpq.quant.core import (
    QuantizedTensor,
    grid_values,
    levels,
    scale_torch_dtype,
)
from mpq.quant.mse import mse_grid
from mpq.quant.rtn import grid_codes, rtn_grid

GRID_RULES = ("rtn", "mse")
SEQUENTIAL = ("layer", "block", "off")


@dataclass(frozen=True)
class GPTQConfig:
    """Options of :func:`gptq_quantize`, and ``sequential``: how
    :func:`mpq.executor.apply_plan` collects the Hessians from calibration data
    (:mod:`mpq.sequential`): ``layer`` (default, GPTQ's order: each layer's inputs from the
    model with everything before it quantized), ``block`` (every layer of a block from the
    block's input in the model with the earlier blocks quantized) or ``off`` (one pass of the
    full-precision model)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    grid: str = "mse"
    sequential: str = "layer"

    def __post_init__(self) -> None:
        if self.grid not in GRID_RULES:
            raise MpqError(f"GPTQ grid={self.grid!r} is unknown; use one of {list(GRID_RULES)}")
        if self.sequential not in SEQUENTIAL:
            raise MpqError(
                f"GPTQ sequential={self.sequential!r} is unknown; use one of {list(SEQUENTIAL)}"
            )
        if not self.damp >= 0:
            raise MpqError(f"GPTQ damp={self.damp} must be >= 0 (0.01 is usual)")
        if self.block_size < 1:
            raise MpqError(f"GPTQ block_size={self.block_size} must be positive")


@dataclass(frozen=True)
class GPTQResult:
    """Codes/scales/zeros (``quantized``), the GPTQ objective ``loss`` (sum of the per-column
    ``(w - q)^2 / [H^-1]_jj^2 / 2``) and the column order used (``perm``, act-order only)."""

    quantized: QuantizedTensor
    loss: float
    perm: torch.Tensor | None


def _grid(
    w: torch.Tensor, fmt: QuantFormat, weights: torch.Tensor | None, grid: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row scale (float32 values of the scale dtype) and zero-point (asymmetric) for the
    columns ``w [rows, n]``: the rtn rule, or the ``mse`` search weighted by ``weights [n]``."""
    w3 = w.float()[:, None, :]
    if grid == "mse":
        a = torch.ones(1, w.shape[1]) if weights is None else weights.float()[None]
        a = a / a.mean().clamp_min(1e-30)
        scale, zero = mse_grid(w3, a.to(w3.device), fmt)
    else:
        scale, zero = rtn_grid(w3, fmt)
    return scale[:, 0], None if zero is None else zero[:, 0]


def _quant_column(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    fmt: QuantFormat,
    table: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes and dequantized values of one column with a given grid."""
    s = scale.to(w.dtype)
    z = None if zero is None else zero.to(w.dtype)
    codes = grid_codes(w[:, None], s, z, fmt)[:, 0]
    return codes, grid_values(codes, s, z, table)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: QuantFormat,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    grid: str = "mse",
) -> GPTQResult:
    """GPTQ of ``weight`` (any shape, viewed as ``[rows, cols]``) under ``hessian [cols, cols]``.

    Float64 on CPU, float32 on other devices. See the module docstring for the options.
    """
    GPTQConfig(damp, block_size, act_order, grid)
    if fmt.keep:
        raise MpqError("gptq_quantize() got a keep (16-bit) format; nothing to quantize")
    shape = tuple(weight.shape)
    check_format(shape, fmt)
    rows, cols = matrix_shape(shape)
    if tuple(hessian.shape) != (cols, cols):
        raise MpqError(
            f"GPTQ Hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols}) for a "
            f"weight of shape {shape}"
        )
    dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    W = weight.detach().reshape(rows, cols).to(dtype).clone()
    H = hessian.detach().to(W.device, dtype).clone()
    if not bool(torch.isfinite(H).all()):
        raise MpqError("GPTQ Hessian has non-finite entries; check the calibration data")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.diag(H).clone()  # the mse grid's per-column weights (original order)
    table = levels(fmt, W.device) if fmt.symmetric else None

    gs = fmt.group_size
    groups = n_groups(cols, fmt)
    scales = torch.zeros(rows, groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(rows, groups, dtype=torch.float32, device=W.device)

    def set_grid(g: int, w: torch.Tensor, lo: int) -> None:
        scale, zero = _grid(w, fmt, diag[lo : lo + w.shape[1]], grid)
        scales[:, g] = scale
        if zero is not None:
            zeros[:, g] = zero

    static = gs is None or act_order
    if static:  # grids from the original weight, fixed before the pass
        for g in range(groups):
            lo = 0 if gs is None else g * gs
            hi = cols if gs is None else lo + gs
            set_grid(g, W[:, lo:hi], lo)

    perm: torch.Tensor | None = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    order = perm if perm is not None else torch.arange(cols, device=W.device)
    group_of = order // gs if gs is not None else torch.zeros_like(order)

    H.diagonal().add_(damp * float(torch.diag(H).mean()))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as exc:
        raise MpqError(
            f"GPTQ: the damped Hessian is not positive definite ({exc}); raise damp "
            f"(now {damp}) or use more calibration data"
        ) from None

    bs = block_size if gs is None else max(gs, block_size // gs * gs)
    codes = torch.zeros(rows, cols, dtype=dtype, device=W.device)
    loss = torch.zeros((), dtype=dtype, device=W.device)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and gs is not None and col % gs == 0:
                set_grid(col // gs, W1[:, i : i + gs], col)
            g_col = int(group_of[col])
            w = W1[:, i]
            zero = None if fmt.symmetric else zeros[:, g_col]
            c, q = _quant_column(w, scales[:, g_col], zero, fmt, table)
            codes[:, col] = c
            d = Hinv1[i, i]
            loss += ((w - q) ** 2).sum() / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        unperm = torch.empty_like(codes)
        unperm[:, perm] = codes
        codes = unperm
    qt = QuantizedTensor(
        codes=codes.to(torch.uint8),
        scales=scales.to(scale_torch_dtype(fmt)),
        zeros=None if fmt.symmetric else zeros.to(torch.uint8),
        shape=shape,
        fmt=fmt,
    )
    return GPTQResult(quantized=qt, loss=float(loss), perm=perm)
