"""Row-mixed weights: some output rows at a high format, the rest at a low one.

A row-mixed format ``low+high@P`` (:class:`~mpq.formats.QuantFormat` with ``hi``) is a finer
unit of allocation than the layer. Every format here keeps its scales (and super-scales) within
a row, so a row quantized inside the full weight is exactly the row quantized alone: the two
parts are the full weight quantized at each format, cut by a row mask.

Which rows: the ``k = hi_rows(rows, fmt)`` rows whose error drops most from low to high,
``gain_r = sum_j imp_j (dlow_rj^2 - dhigh_rj^2)`` with ``imp`` the layer's importance per input
column (what ``mse`` weighs; 1 without statistics), ties to the lower row index. Each row's
error enters the layer's output error ``tr(dW H dW^T)`` on its own (the trace is a sum over
rows), which is what the anchored measured table carries to these formats.

A column-mixed format ``low+high#P`` (``hi_axis == "cols"``) splits the input columns instead:
the ``k = hi_cols(cols, fmt)`` columns with the largest importance-weighted error at the low
format, ``score_j = imp_j * sum_r dlow_rj^2`` (ties to the lower column index), are quantized
as their own ``[rows, k]`` matrix at the high format, the others as a ``[rows, cols - k]``
matrix at the low one (groups and super-blocks run over each part's columns in order). Only the
low format's whole-weight error is shared with other formats (it ranks the columns); the parts
are quantized from the cut matrices, with the importance of their own columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mpq.formats import QuantFormat, hi_cols, hi_rows, matrix_shape
from mpq.quant.core import QuantizedTensor
from mpq.quant.dq import take_rows


@dataclass(frozen=True)
class RowParts:
    """The high part of a row- (column-) mixed weight and the row (column) mask (``True`` =
    high, ``[rows]`` or ``[cols]``). The low part is the enclosing :class:`QuantizedTensor`'s
    own codes and scales."""

    high: QuantizedTensor
    mask: torch.Tensor


def select_rows(
    weight: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    k: int,
    importance: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean mask ``[rows]`` of the ``k`` rows whose weighted error drops most from the
    dequantized ``low`` to ``high`` (all ``[rows, cols]``), ties to the lower row index."""
    w = weight.detach().double()
    imp = torch.ones(w.shape[1], dtype=torch.float64) if importance is None else importance.double()
    gain = (((low.double() - w) ** 2 - (high.double() - w) ** 2) * imp).sum(1)
    order = torch.argsort(-gain, stable=True)
    mask = torch.zeros(w.shape[0], dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def rows_of(qt: QuantizedTensor, rows: torch.Tensor) -> QuantizedTensor:
    """The rows ``rows`` (indices or a mask) of a plain quantized weight, as its own weight."""
    codes = qt.codes[rows]
    shape = (int(codes.shape[0]), *qt.shape[1:])
    zeros = None if qt.zeros is None else qt.zeros[rows]
    dq = None if qt.dq is None else take_rows(qt.dq, rows)
    return QuantizedTensor(codes, qt.scales[rows], zeros, shape, qt.fmt, dq)


def select_cols(
    weight: torch.Tensor, low: torch.Tensor, k: int, importance: torch.Tensor | None
) -> torch.Tensor:
    """Boolean mask ``[cols]`` of the ``k`` input columns with the largest error of the
    dequantized ``low`` (both ``[rows, cols]``) weighted by ``importance``, ties to the lower
    column index."""
    w = weight.detach().double()
    err = ((low.double() - w) ** 2).sum(0)
    if importance is not None:
        err = err * importance.double()
    order = torch.argsort(-err, stable=True)
    mask = torch.zeros(w.shape[1], dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def quantize_colmix(
    weight: torch.Tensor,
    fmt: QuantFormat,
    importance: torch.Tensor | None,
    part: Callable[[QuantFormat], QuantizedTensor],
    sub: Callable[[torch.Tensor, QuantFormat, torch.Tensor | None], QuantizedTensor],
    dequantize: Callable[[QuantizedTensor], torch.Tensor],
) -> QuantizedTensor:
    """``weight`` (a matrix) at the column-mixed ``fmt``: ``part(f)`` quantizes the whole
    weight at a plain format (memoized by callers; it ranks the columns), ``sub(w, f, imp)`` a
    cut matrix with its columns' importance."""
    assert fmt.hi is not None
    rows, cols = matrix_shape(tuple(weight.shape))
    w = weight.reshape(rows, cols)
    low_whole = dequantize(part(fmt.low)).reshape(rows, cols)
    mask = select_cols(w, low_whole, hi_cols(cols, fmt), importance)

    def quantize_cols(m: torch.Tensor, f: QuantFormat) -> QuantizedTensor:
        return sub(w[:, m].contiguous(), f, None if importance is None else importance[m])

    lo, hi = quantize_cols(~mask, fmt.low), quantize_cols(mask, fmt.hi)
    return QuantizedTensor(
        lo.codes, lo.scales, lo.zeros, tuple(weight.shape), fmt, lo.dq, parts=RowParts(hi, mask)
    )


def quantize_rowmix(
    weight: torch.Tensor,
    fmt: QuantFormat,
    importance: torch.Tensor | None,
    part: Callable[[QuantFormat], QuantizedTensor],
    dequantize: Callable[[QuantizedTensor], torch.Tensor],
) -> QuantizedTensor:
    """``weight`` at the row-mixed ``fmt``; ``part(f)`` quantizes the whole weight at a plain
    format (callers memoize it: the same parts serve every percent of one pair)."""
    assert fmt.hi is not None
    rows, cols = matrix_shape(tuple(weight.shape))
    low, high = part(fmt.low), part(fmt.hi)
    w = weight.reshape(rows, cols)
    mask = select_rows(
        w, dequantize(low).reshape(rows, cols), dequantize(high).reshape(rows, cols),
        hi_rows(rows, fmt), importance,
    )  # fmt: skip
    lo = rows_of(low, ~mask)
    return QuantizedTensor(
        lo.codes, lo.scales, lo.zeros, tuple(weight.shape), fmt, lo.dq,
        parts=RowParts(rows_of(high, mask), mask),
    )  # fmt: skip


def low_part(qt: QuantizedTensor) -> QuantizedTensor:
    """The low rows (columns) of a row- (column-) mixed weight as a plain quantized weight of
    the low format."""
    assert qt.parts is not None
    if qt.fmt.hi_axis == "cols":
        shape: tuple[int, ...] = (qt.shape[0], int(qt.codes.shape[1]))
    else:
        shape = (int(qt.codes.shape[0]), *qt.shape[1:])
    return QuantizedTensor(qt.codes, qt.scales, qt.zeros, shape, qt.fmt.low, qt.dq)


def assemble(qt: QuantizedTensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The ``[rows, cols]`` matrix of a row- (column-) mixed weight from its parts' dequantized
    rows (columns)."""
    assert qt.parts is not None
    rows, cols = matrix_shape(qt.shape)
    out = torch.empty(rows, cols, dtype=low.dtype)
    if qt.fmt.hi_axis == "cols":
        out[:, ~qt.parts.mask] = low.reshape(rows, -1)
        out[:, qt.parts.mask] = high.reshape(rows, -1)
        return out
    out[~qt.parts.mask] = low.reshape(-1, cols)
    out[qt.parts.mask] = high.reshape(-1, cols)
    return out
