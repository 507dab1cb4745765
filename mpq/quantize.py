"""Round-to-nearest quantization as pure functions.

A weight of any shape is viewed as a matrix ``[out_channels, -1]`` (conv kernels flattened, the
row of an embedding is its channel). Scales are rounded to the format's scale dtype *before*
the codes are computed, so ``dequantize(quantize(w))`` is exactly what a deployed kernel computes.

Symmetric: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)`` with ``s = max|w| / (2^(b-1) - 1)``,
codes stored unsigned as ``q + 2^(b-1)``. Asymmetric: ``s = (max - min) / (2^b - 1)``, integer
zero-point ``z = clamp(round(-min / s), 0, 2^b - 1)``, ``q = clamp(round(w / s) + z, 0, 2^b - 1)``.
Dequantized: ``(q - z) * s``. ``:dq`` formats (double-quantized scales) quantize and
dequantize in :mod:`mpq.dq`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.dq import DoubleQuant, dequantize_dq, effective, quantize_dq
from mpq.errors import MpqError
from mpq.formats import QuantFormat

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def scale_torch_dtype(fmt: QuantFormat) -> torch.dtype:
    return _DTYPES[fmt.scale_dtype]


@dataclass(frozen=True)
class QuantizedTensor:
    """Unsigned codes ``[rows, cols]`` (uint8), scales ``[rows, groups]`` in the scale dtype and,
    for asymmetric formats, integer zero-points ``[rows, groups]`` (uint8). ``:dq`` formats carry
    their stored scale codes in ``dq`` (``scales`` are then the float32 group scales they stand
    for, ``zeros`` None)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, ...]
    fmt: QuantFormat
    dq: DoubleQuant | None = None


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``[rows, cols]`` view under which a weight of ``shape`` is quantized."""
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


def n_groups(cols: int, fmt: QuantFormat) -> int:
    """Groups per row; the group size must divide the row length (see :func:`check_format`)."""
    return 1 if fmt.group_size is None else cols // fmt.group_size


def check_format(shape: tuple[int, ...], fmt: QuantFormat, name: str = "weight") -> None:
    """Raise :class:`MpqError` when ``fmt`` cannot store a weight of ``shape``."""
    if fmt.keep:
        return
    _, cols = matrix_shape(shape)
    if fmt.group_size is not None and cols % fmt.group_size != 0:
        divisors = [g for g in (32, 64, 128, 256) if cols % g == 0]
        raise MpqError(
            f"{name}: group size {fmt.group_size} does not divide its row length {cols}; "
            f"use per-channel (no g<N>) or one of the group sizes {divisors or 'none'}"
        )


def fits(shape: tuple[int, ...], fmt: QuantFormat) -> bool:
    """Whether ``fmt`` can store a weight of ``shape`` (:func:`check_format` passes)."""
    try:
        check_format(shape, fmt)
    except MpqError:
        return False
    return True


def quantize(
    weight: torch.Tensor, fmt: QuantFormat, *, hessian: torch.Tensor | None = None
) -> QuantizedTensor:
    """Quantization of ``weight`` to ``fmt`` (which must not be ``keep``).

    ``fmt.method == "rtn"``: round to nearest (below). ``"gptq"``: :func:`mpq.gptq.gptq_quantize`
    with its default options, which needs ``hessian``, the ``[cols, cols]`` second moment of the
    layer's inputs (``apply_plan(..., calib=...)`` collects it).
    """
    if fmt.keep:
        raise MpqError("quantize() got a keep (16-bit) format; keep weights need no codes")
    shape = tuple(weight.shape)
    check_format(shape, fmt)
    if fmt.dq_bits is not None:
        if fmt.method != "rtn":
            raise MpqError(
                f"format {fmt.spec()}: double-quantized scales are rounded to nearest only; "
                f"drop :{fmt.method} or :dq"
            )
        rows, cols = matrix_shape(shape)
        codes, dq = quantize_dq(weight.reshape(rows, cols), fmt)
        return QuantizedTensor(codes, effective(dq, fmt)[0], None, shape, fmt, dq)
    if fmt.method == "gptq":
        if hessian is None:
            raise MpqError(
                f"format {fmt.spec()} uses GPTQ, which needs the Hessian of the layer's inputs: "
                f"pass calibration data (apply_plan(..., calib=batches)) or use an rtn format"
            )
        from mpq.gptq import gptq_quantize

        return gptq_quantize(weight, hessian, fmt).quantized
    rows, cols = matrix_shape(shape)
    groups = n_groups(cols, fmt)
    w = weight.detach().to(torch.float32).reshape(rows, groups, cols // groups)
    sdtype = scale_torch_dtype(fmt)
    tiny = torch.finfo(sdtype).tiny
    if fmt.symmetric:
        absmax = w.abs().amax(dim=-1)
        scale = (absmax / fmt.qmax).clamp_min(tiny).to(sdtype).float().clamp_min(tiny)
        q = torch.clamp(torch.round(w / scale[..., None]), fmt.qmin, fmt.qmax)
        codes = (q - fmt.qmin).to(torch.uint8)
        zeros = None
    else:
        lo = w.amin(dim=-1).clamp_max(0.0)
        hi = w.amax(dim=-1).clamp_min(0.0)
        scale = ((hi - lo) / fmt.qmax).clamp_min(tiny).to(sdtype).float().clamp_min(tiny)
        z = torch.clamp(torch.round(-lo / scale), 0, fmt.qmax)
        q = torch.clamp(torch.round(w / scale[..., None]) + z[..., None], 0, fmt.qmax)
        codes = q.to(torch.uint8)
        zeros = z.to(torch.uint8)
    return QuantizedTensor(
        codes=codes.reshape(rows, cols),
        scales=scale.to(sdtype),
        zeros=zeros,
        shape=shape,
        fmt=fmt,
    )


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    fmt: QuantFormat,
) -> torch.Tensor:
    """Float32 matrix ``[rows, cols]`` from unsigned codes, scales and zero-points."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    q = codes.to(torch.float32).reshape(rows, groups, cols // groups)
    offset = (
        zeros.to(torch.float32)
        if zeros is not None
        else torch.full_like(scales, float(-fmt.qmin), dtype=torch.float32)
    )
    w = (q - offset[..., None]) * scales.to(torch.float32)[..., None]
    return w.reshape(rows, cols)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 weight (original shape) that ``qt`` stands for."""
    if qt.dq is not None:
        return dequantize_dq(qt.codes, qt.dq, qt.fmt).reshape(qt.shape)
    return dequantize_codes(qt.codes, qt.scales, qt.zeros, qt.fmt).reshape(qt.shape)


def keep_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight kept in high precision is stored as float16."""
    return weight.detach().to(torch.float16)


def fake_quantize(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The weight as the executor will compute with it, in ``weight``'s dtype."""
    if fmt.keep:
        return keep_weight(weight).to(weight.dtype)
    return dequantize(quantize(weight, fmt)).to(weight.dtype)


def quant_error(weight: torch.Tensor, fmt: QuantFormat) -> float:
    """Squared Frobenius norm ``||Q(W) - W||^2`` (the distortion model's weight term)."""
    return float((fake_quantize(weight, fmt).float() - weight.detach().float()).pow(2).sum())
