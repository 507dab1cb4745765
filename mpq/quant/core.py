"""What every quantizer produces and how it is read back.

A weight of any shape is viewed as a matrix ``[out_channels, -1]`` (conv kernels flattened, the
row of an embedding is its channel), cut into groups of ``group_size`` columns (one group per
row when per channel). Every group has a scale ``s`` (stored at the format's scale dtype) and,
asymmetric, an integer zero-point ``z``. Codes are unsigned integers ``0 .. 2^b - 1``.

- **symmetric** formats read a code through a table of levels: ``w = s * levels[code]``. The
  ``int`` grid's levels are the full signed range ``-2^(b-1) .. 2^(b-1) - 1`` (code
  ``q + 2^(b-1)`` holds the integer ``q``); ``nl`` is llama.cpp IQ4_NL's 16 int8 values,
  ``nf4`` QLoRA's NormalFloat-4 values. A scale may be negative (llama.cpp's Q4_0 rule maps the
  signed value of largest magnitude to the most negative level).
- **asymmetric** formats: ``w = (code - z) * s`` with ``s > 0``, ``0 <= z <= 2^b - 1``.

``QUANT_VERSION`` changes whenever a quantizer's output changes for the same input; caches of
quantized results include it in their keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mpq.errors import MpqError
from mpq.formats import QuantFormat, matrix_shape, n_groups

QUANT_VERSION = 2
"""1: symmetric absmax/(2^(b-1)-1); 2: full signed range, mse, non-uniform grids."""

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# llama.cpp's kvalues_iq4nl (ggml-common.h): IQ4_NL / IQ4_XS levels, read as ``d * value``.
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# QLoRA NormalFloat-4 (bitsandbytes' table), read as ``absmax * value``.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def scale_torch_dtype(fmt: QuantFormat) -> torch.dtype:
    return _DTYPES[fmt.scale_dtype]


@dataclass(frozen=True)
class DoubleQuant:
    """The stored scale side of a ``:dq`` weight: ``super_scales [rows, supers]`` (scale dtype),
    ``scale_codes [rows, groups]`` (uint8, unsigned k-bit codes; signed for symmetric formats
    as ``code - 2^(k-1)``), and for asymmetric formats ``super_mins`` and ``min_codes``."""

    super_scales: torch.Tensor
    scale_codes: torch.Tensor
    super_mins: torch.Tensor | None = None
    min_codes: torch.Tensor | None = None


@dataclass(frozen=True)
class QuantizedTensor:
    """Unsigned codes ``[rows, cols]`` (uint8), scales ``[rows, groups]`` in the scale dtype and,
    for asymmetric formats, integer zero-points ``[rows, groups]`` (uint8). ``:dq`` formats carry
    their stored scale codes in ``dq`` (``scales`` are then the float32 group scales they stand
    for, ``zeros`` None). A row-mixed weight carries its high rows in ``parts``
    (:class:`mpq.quant.rowmix.RowParts`)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, ...]
    fmt: QuantFormat
    dq: DoubleQuant | None = None
    # Row-mixed formats (:mod:`mpq.quant.rowmix`): the fields above hold the low rows only (in
    # order), ``parts`` the high rows and the row mask.
    parts: Any = None


def levels(fmt: QuantFormat, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 value of each code of a symmetric format (ascending), ``[2^bits]``."""
    if not fmt.symmetric:
        raise MpqError(f"format {fmt.spec()} is asymmetric; its codes have no level table")
    if fmt.grid == "nl":
        table: tuple[float, ...] = tuple(float(v) for v in IQ4_NL_LEVELS)
    elif fmt.grid == "nf4":
        table = NF4_LEVELS
    else:
        half = 1 << (fmt.bits - 1)
        table = tuple(float(v) for v in range(-half, half))
    return torch.tensor(table, dtype=torch.float32, device=device)


def round_scale(scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``scale`` rounded to the format's scale dtype (float32 values), never zero: magnitudes
    below the dtype's smallest normal become that value, with the sign kept (0 -> +tiny)."""
    sdtype = scale_torch_dtype(fmt)
    tiny = torch.finfo(sdtype).tiny
    sign = torch.where(scale < 0, -1.0, 1.0)
    return (sign * scale.abs().clamp_min(tiny)).to(sdtype).float()


# Integer level tables (IQ4_NL's) spanning at most this many units are looked up on the
# half-unit lattice their midpoints lie on instead of searched (same answer, ~1.4x faster).
_LATTICE_SPAN = 4096


def nearest_codes(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the level of ``table`` (ascending) nearest to each value of ``x`` (int64); a
    value half-way between two levels takes the lower one, NaN the highest."""
    mid = (table[1:] + table[:-1]) / 2
    span = float(table[-1] - table[0]) if table.numel() > 1 else 0.0
    if table.numel() < 2 or not bool((table == table.round()).all()) or span > _LATTICE_SPAN:
        return torch.bucketize(x.contiguous(), mid)
    # Every midpoint is a multiple of 1/2, so all of ((k-1)/2, k/2] shares one bucket: the one
    # of k/2 itself (bucketize puts a value equal to a midpoint in the lower bucket).
    lo = int(torch.floor(2 * mid[0])) - 1
    hi = int(torch.ceil(2 * mid[-1])) + 1
    lut = torch.bucketize(torch.arange(lo, hi + 1, dtype=x.dtype, device=x.device) / 2, mid)
    k = torch.nan_to_num_(torch.ceil(x * 2), nan=hi, posinf=hi, neginf=lo).clamp_(lo, hi)
    return lut[k.long() - lo]


def symmetric_codes(w: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes (int64) of ``w [..., n]`` on a symmetric grid with scales ``scale [...]``."""
    x = w / scale[..., None]
    if fmt.grid == "int":
        half = 1 << (fmt.bits - 1)
        return torch.clamp(torch.round(x), -half, half - 1).long() + half
    return nearest_codes(x, levels(fmt, w.device))


def symmetric_values(w: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The level (float32, before scaling) nearest to each ``w / scale`` on a symmetric grid."""
    x = w / scale[..., None]
    if fmt.grid == "int":
        half = float(1 << (fmt.bits - 1))
        return torch.clamp(torch.round(x), -half, half - 1)
    table = levels(fmt, w.device)
    return table[nearest_codes(x, table)]


def asymmetric_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat
) -> torch.Tensor:
    """Codes (int64) of ``w [..., n]`` for scales and integer zero-points ``[...]``."""
    qmax = (1 << fmt.bits) - 1
    return torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, qmax).long()


def grid_values(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    table: torch.Tensor | None,
) -> torch.Tensor:
    """Values of ``codes`` on one grid, in ``scale``'s dtype (``scale``/``zero`` already
    broadcast against ``codes``): ``table[code] * scale`` for a symmetric grid (no zero-point),
    ``(code - zero) * scale`` for an asymmetric one."""
    if zero is None:
        assert table is not None
        return table.to(scale.dtype)[codes] * scale
    return (codes.to(scale.dtype) - zero.to(scale.dtype)) * scale


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    fmt: QuantFormat,
) -> torch.Tensor:
    """Float32 matrix ``[rows, cols]`` from unsigned codes, scales and zero-points."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    s = scales.to(torch.float32)[..., None]
    if fmt.symmetric:
        if fmt.grid == "int":
            q = codes.to(torch.float32) - float(1 << (fmt.bits - 1))
        else:
            q = levels(fmt, codes.device)[codes.long()]
        w = q.reshape(rows, groups, cols // groups) * s
    else:
        if zeros is None:
            raise MpqError(f"format {fmt.spec()} is asymmetric and needs its zero-points")
        q = codes.to(torch.float32).reshape(rows, groups, cols // groups)
        w = (q - zeros.to(torch.float32)[..., None]) * s
    return w.reshape(rows, cols)


def grouped(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``weight`` as float32 ``[rows, groups, group_size]``."""
    rows, cols = matrix_shape(tuple(weight.shape))
    groups = n_groups(cols, fmt)
    return weight.detach().to(torch.float32).reshape(rows, groups, cols // groups)


def pack_result(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    shape: tuple[int, ...],
    fmt: QuantFormat,
) -> QuantizedTensor:
    """A :class:`QuantizedTensor` from grouped int codes ``[rows, groups, n]`` and float scales
    (already at the scale dtype's values) and zero-points ``[rows, groups]``."""
    rows, cols = matrix_shape(shape)
    return QuantizedTensor(
        codes=codes.reshape(rows, cols).to(torch.uint8),
        scales=scale.to(scale_torch_dtype(fmt)),
        zeros=None if zero is None else zero.to(torch.uint8),
        shape=shape,
        fmt=fmt,
    )
