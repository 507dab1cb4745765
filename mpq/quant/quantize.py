"""Quantization of one weight: the one place that dispatches on a format's method.

``quantize(weight, fmt, importance=..., hessian=...)`` returns the codes, scales and
zero-points of :class:`~mpq.quant.core.QuantizedTensor` (storage and grids are documented
there):

- ``rtn``: round to nearest on the min/max grid (:mod:`mpq.quant.rtn`; symmetric formats use
  the full signed range, llama.cpp's Q4_0 rule);
- ``mse``: the per-group search that minimizes the reconstruction error, weighted per input
  column by ``importance`` (the mean of x^2 over calibration inputs) when given
  (:mod:`mpq.quant.mse`);
- ``gptq``: GPTQ under ``hessian``, the ``[cols, cols]`` second moment of the layer's inputs
  (:mod:`mpq.quant.gptq`).

``:dq`` formats (double-quantized scales) store and dequantize as :mod:`mpq.quant.dq` says; their
codes are round-to-nearest (:func:`mpq.quant.dq.quantize_dq`) or, for ``mse``, chosen by the
importance-weighted error at both levels (:mod:`mpq.quant.mse_dq`). GPTQ does not take them.

All are pure functions of their inputs; scales are rounded to the scale dtype before codes are
computed, so ``dequantize(quantize(w))`` is exactly what a deployed kernel computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mpq.errors import MpqError
from mpq.formats import QuantFormat, check_format, fits, matrix_shape, n_groups
from mpq.quant.core import (
    QUANT_VERSION,
    QuantizedTensor,
    dequantize_codes,
    levels,
    scale_torch_dtype,
)
from mpq.quant.dq import dequantize_dq, effective, quantize_dq
from mpq.quant.gptq import gptq_quantize
from mpq.quant.mse import mse_quantize
from mpq.quant.mse_dq import mse_quantize_dq
from mpq.quant.rowmix import assemble, low_part, quantize_colmix, quantize_rowmix
from mpq.quant.rtn import rtn_quantize

__all__ = [
    "QUANT_VERSION",
    "QuantizedTensor",
    "check_format",
    "dequantize",
    "dequantize_codes",
    "fake_quantize",
    "fits",
    "keep_weight",
    "levels",
    "matrix_shape",
    "n_groups",
    "quant_error",
    "quantize",
    "scale_torch_dtype",
]


def quantize(
    weight: torch.Tensor,
    fmt: QuantFormat,
    *,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    part: Callable[[QuantFormat], QuantizedTensor] | None = None,
) -> QuantizedTensor:
    """Quantization of ``weight`` to ``fmt`` (which must not be ``keep``) by ``fmt.method``.

    ``importance`` ``[cols]``: per-input-column weight of the ``mse`` error (ignored by ``rtn``;
    without it ``mse`` minimizes the plain squared error). ``hessian`` ``[cols, cols]``: needed
    by ``gptq`` (``apply_plan(..., calib=...)`` collects both). A row-mixed format
    (:mod:`mpq.quant.rowmix`) quantizes the whole weight at both parts, by ``part(f)`` when
    given (a memoizing caller's), and keeps each row at its part; its rows are chosen by the
    error weighted with ``importance`` (callers pass it for ``mse`` parts only). A column-mixed
    one ranks the columns by the low format's whole-weight error (``part``) and quantizes each
    part from its own columns.
    """
    if fmt.keep:
        raise MpqError("quantize() got a keep (16-bit) format; keep weights need no codes")
    shape = tuple(weight.shape)
    check_format(shape, fmt)
    if fmt.hi is not None:

        def whole(f: QuantFormat) -> QuantizedTensor:
            return quantize(weight, f, importance=importance, hessian=hessian)

        if fmt.hi_axis == "cols":

            def sub(w: torch.Tensor, f: QuantFormat, imp: torch.Tensor | None) -> QuantizedTensor:
                return quantize(w, f, importance=imp)

            return quantize_colmix(weight, fmt, importance, part or whole, sub, dequantize)
        return quantize_rowmix(weight, fmt, importance, part or whole, dequantize)
    if fmt.dq_bits is not None:
        if fmt.method == "gptq":
            raise MpqError(
                f"format {fmt.spec()}: GPTQ does not choose double-quantized scales; "
                f"use :mse (importance-weighted) or drop :dq"
            )
        rows, cols = matrix_shape(shape)
        if fmt.method == "mse":
            codes, dq = mse_quantize_dq(weight.reshape(rows, cols), fmt, importance)
        else:
            codes, dq = quantize_dq(weight.reshape(rows, cols), fmt)
        return QuantizedTensor(codes, effective(dq, fmt)[0], None, shape, fmt, dq)
    if fmt.method == "gptq":
        if hessian is None:
            raise MpqError(
                f"format {fmt.spec()} uses GPTQ, which needs the Hessian of the layer's inputs: "
                f"pass calibration data (apply_plan(..., calib=batches)) or use an rtn format"
            )
        return gptq_quantize(weight, hessian, fmt).quantized
    if fmt.method == "mse":
        return mse_quantize(weight, fmt, importance)
    return rtn_quantize(weight, fmt)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 weight (original shape) that ``qt`` stands for."""
    if qt.parts is not None:
        low = dequantize(low_part(qt))
        return assemble(qt, low, dequantize(qt.parts.high)).reshape(qt.shape)
    if qt.dq is not None:
        return dequantize_dq(qt.codes, qt.dq, qt.fmt).reshape(qt.shape)
    return dequantize_codes(qt.codes, qt.scales, qt.zeros, qt.fmt).reshape(qt.shape)


def keep_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight kept in high precision is stored as float16."""
    return weight.detach().to(torch.float16)


def fake_quantize(
    weight: torch.Tensor,
    fmt: QuantFormat,
    *,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight as the executor will compute with it, in ``weight``'s dtype."""
    if fmt.keep:
        return keep_weight(weight).to(weight.dtype)
    qt = quantize(weight, fmt, importance=importance, hessian=hessian)
    return dequantize(qt).to(weight.dtype)


def quant_error(
    weight: torch.Tensor, fmt: QuantFormat, *, importance: torch.Tensor | None = None
) -> float:
    """Squared Frobenius norm ``||Q(W) - W||^2`` (the distortion model's weight term)."""
    q = fake_quantize(weight, fmt, importance=importance)
    return float((q.float() - weight.detach().float()).pow(2).sum())
