"""Double-quantized group scales (``:dq`` formats, llama.cpp's k-quant layout) as pure functions.

A ``:dq`` format (``4:g32:asym:dq``, ``4:g32:dq``, ``6:g16:dq8``...) stores each group's scale,
and for asymmetric formats each group's min, as an unsigned ``dq_bits``-bit code under one
super-scale (and one super-min) per **super-block of 256 weights** of a row, at the format's
scale dtype:

- symmetric: ``w = s * levels[u]`` with ``s = D * (c - 2^(k-1))`` (signed scale codes), the
  levels of the format's grid (``int``: ``u - 2^(b-1)``; ``nl``: llama.cpp IQ4_NL's 16 values,
  so ``4:g32:nl:dq`` is IQ4_XS; ``nf4``); the group's signed extreme maps to the most negative
  level (llama.cpp's rule: the full signed range, no wasted level) and the super-block's signed
  extreme scale to the code ``-2^(k-1)``;
- asymmetric: ``w = s * u - m`` with ``s = D * c`` and ``m = Dm * c_m`` (``c, c_m`` unsigned
  k-bit codes, ``m = max(0, -min(w))``), llama.cpp's Q2_K/Q4_K/Q5_K form.

``D * c`` is exact in float32 (an fp16 value times an integer below 2^8), so
``dequantize_dq`` gives the float32 weights llama.cpp computes, bit for bit.

**Rows that do not divide 256** (SmolLM2's 576-wide rows): the row is cut into super-blocks of
256 weights from its start, and the last super-block holds the remaining ``cols mod 256``
weights (a whole number of groups) with its own super-scale, so a 576-wide row has three
super-blocks (256, 256, 64) and ``ceil(cols / 256)`` super-scales. mpq stores, costs and runs
that exactly; GGUF's k-quant types cannot hold such rows, so ``--format gguf`` refuses them with
the tensor's name (llama.cpp itself falls back to another type there).

Quantization is round-to-nearest at both levels: group scales (and mins) from the group's
range, super-scales from the largest group scale (min) of the super-block, rounded to the
scale dtype, group codes from that, then the weight codes from the effective scales.
"""

from __future__ import annotations

import torch

from mpq.formats import SUPER_BLOCK, QuantFormat, n_supers
from mpq.quant.core import DoubleQuant, levels, nearest_codes, scale_torch_dtype


def take_rows(dq: DoubleQuant, rows: torch.Tensor) -> DoubleQuant:
    """The scale codes of the rows ``rows`` (a row permutation or selection)."""
    mins = None if dq.super_mins is None else dq.super_mins[rows]
    codes = None if dq.min_codes is None else dq.min_codes[rows]
    return DoubleQuant(dq.super_scales[rows], dq.scale_codes[rows], mins, codes)


def super_of_group(cols: int, fmt: QuantFormat) -> torch.Tensor:
    """The super-block index of every group of a row (``[groups]``, long)."""
    assert fmt.group_size is not None
    groups = cols // fmt.group_size
    return torch.arange(groups) // (SUPER_BLOCK // fmt.group_size)


def _signed_extreme(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The entry of largest magnitude along ``dim``, with its sign."""
    idx = x.abs().argmax(dim=dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim)


def super_reduce(x: torch.Tensor, sup: torch.Tensor, supers: int, signed: bool) -> torch.Tensor:
    """Per super-block extreme of ``x [rows, groups]``: signed extreme or plain max."""
    rows = x.shape[0]
    out = torch.zeros(rows, supers, dtype=x.dtype)
    for j in range(supers):
        part = x[:, sup == j]
        out[:, j] = _signed_extreme(part, 1) if signed else part.amax(dim=1)
    return out


def cast_scale(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``x`` cast to the format's scale dtype (float32 values; zeros stay zero)."""
    return x.to(scale_torch_dtype(fmt)).float()


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def effective(dq: DoubleQuant, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 group scales ``[rows, groups]`` (and mins, asymmetric) the codes stand for."""
    assert fmt.dq_bits is not None and fmt.group_size is not None
    rows, groups = dq.scale_codes.shape
    sup = super_of_group(groups * fmt.group_size, fmt)
    d = dq.super_scales.float()[:, sup]
    c = dq.scale_codes.float()
    if fmt.symmetric:
        c = c - float(1 << (fmt.dq_bits - 1))
        return d * c, None
    assert dq.super_mins is not None and dq.min_codes is not None
    return d * c, dq.super_mins.float()[:, sup] * dq.min_codes.float()


def quantize_dq(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, DoubleQuant]:
    """Unsigned codes ``[rows, cols]`` and the double-quantized scales of ``w [rows, cols]``."""
    assert fmt.dq_bits is not None and fmt.group_size is not None
    rows, cols = w.shape
    g = fmt.group_size
    groups = cols // g
    x = w.detach().float().reshape(rows, groups, g)
    sup = super_of_group(cols, fmt)
    supers = n_supers(cols)
    k = fmt.dq_bits
    if fmt.symmetric:
        table = levels(fmt)
        s = _signed_extreme(x, 2) / table[0]  # the signed extreme lands on the lowest level
        kmin, kmax = -(1 << (k - 1)), (1 << (k - 1)) - 1
        d = cast_scale(super_reduce(s, sup, supers, signed=True) / kmin, fmt)
        c = torch.clamp(torch.round(_safe_div(s, d[:, sup])), kmin, kmax)
        dq = DoubleQuant(d.to(scale_torch_dtype(fmt)), (c - kmin).to(torch.uint8))
    else:
        cmax = (1 << k) - 1
        lo = x.amin(dim=2).clamp_max(0.0)
        hi = x.amax(dim=2).clamp_min(0.0)
        s = (hi - lo) / fmt.qmax
        m = -lo
        d = cast_scale(super_reduce(s, sup, supers, signed=False) / cmax, fmt)
        dm = cast_scale(super_reduce(m, sup, supers, signed=False) / cmax, fmt)
        c = torch.clamp(torch.round(_safe_div(s, d[:, sup])), 0, cmax)
        cm = torch.clamp(torch.round(_safe_div(m, dm[:, sup])), 0, cmax)
        dq = DoubleQuant(
            d.to(scale_torch_dtype(fmt)),
            c.to(torch.uint8),
            dm.to(scale_torch_dtype(fmt)),
            cm.to(torch.uint8),
        )
    return weight_codes(x, dq, fmt).reshape(rows, cols), dq


def weight_codes(x: torch.Tensor, dq: DoubleQuant, fmt: QuantFormat) -> torch.Tensor:
    """Unsigned codes (uint8) of grouped ``x [rows, groups, n]`` under the stored scales
    ``dq``: the nearest level of ``x / s`` (symmetric) or ``clamp(round((x + m) / s))``."""
    scale, mins = effective(dq, fmt)
    if mins is None:
        codes = nearest_codes(_safe_div(x, scale[..., None]), levels(fmt))
        return codes.to(torch.uint8)
    q = torch.round(_safe_div(x + mins[..., None], scale[..., None].expand_as(x)))
    return torch.clamp(q, 0, fmt.qmax).to(torch.uint8)


def dequantize_dq(codes: torch.Tensor, dq: DoubleQuant, fmt: QuantFormat) -> torch.Tensor:
    """Float32 ``[rows, cols]``: ``s * levels[u]`` or ``s * u - m`` (llama.cpp's order)."""
    rows, cols = codes.shape
    scale, mins = effective(dq, fmt)
    groups = scale.shape[1]
    u = codes.float().reshape(rows, groups, cols // groups)
    if mins is None:
        w = scale[..., None] * levels(fmt)[codes.long()].reshape(rows, groups, cols // groups)
    else:
        w = scale[..., None] * u - mins[..., None]
    return w.reshape(rows, cols)
