"""The ``mse`` method on double-quantized scales (``4:g32:nl:dq:mse``, ``4:g32:asym:dq:mse``).

The k-quant layout (:mod:`mpq.quant.dq`) stores each group's scale (and min) as a ``dq_bits`` code
under a super-scale per 256 weights of a row. Choosing those codes well is what llama.cpp's
importance matrix buys on IQ4_XS / Q4_K; here, per row (rows are independent):

1. every group's scale (and zero-point) by the importance-weighted ``mse`` search of
   :mod:`mpq.quant.mse` at the group level, the min of an asymmetric group being
   ``scale * zero``;
2. the super-scales from those group scales (symmetric: the signed extreme on the most negative
   scale code, as :func:`.dq.quantize_dq`; asymmetric: the largest scale and min over the top
   code), rounded to the scale dtype;
3. every group's scale code (and min code) chosen among its rounded value and the neighbouring
   codes (3 candidates, 3 x 3 asymmetric) by the weighted error of the group's weights
   re-rounded on each candidate grid: llama.cpp rounds this code and stops;
4. per super-block, the round-to-nearest ``:dq`` result (:func:`mpq.quant.dq.quantize_dq`) is kept
   wherever it has the smaller weighted error, so ``mse`` never does worse than ``rtn`` on any
   super-block under the weights it was given.

The result is stored, costed and dequantized exactly as the rtn ``:dq`` result of the same
format: only the codes differ.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mpq.formats import QuantFormat, n_supers
from mpq.quant.core import DoubleQuant, levels, nearest_codes, scale_torch_dtype
from mpq.quant.dq import (
    cast_scale,
    dequantize_dq,
    quantize_dq,
    super_of_group,
    super_reduce,
    weight_codes,
)
from mpq.quant.mse import MseOptions, importance_weights, mse_grid

_ROW_CHUNK = 2048  # rows per batch: 9 candidate grids of a 2048 x 576 block stay near 40 MiB


def _sym_values(x: torch.Tensor, scale: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Dequantized ``x [..., n]`` on the level table at ``scale [...]`` (0 where scale is 0)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    idx = nearest_codes(x / safe[..., None], table)
    return torch.where((scale == 0)[..., None], 0.0, table[idx] * scale[..., None])


def _asym_values(
    x: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, qmax: int
) -> torch.Tensor:
    """Dequantized ``x`` as ``s * u - m`` with ``u = clamp(round((x + m) / s), 0, qmax)``."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    u = torch.clamp(torch.round((x + mins[..., None]) / safe[..., None]), 0, qmax)
    u = torch.where((scale == 0)[..., None], 0.0, u)
    return scale[..., None] * u - mins[..., None]


def _err(x: torch.Tensor, deq: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    d = (x - deq) ** 2
    return (d if a is None else a * d).sum(-1)


def _pick_sym(
    x: torch.Tensor, a: torch.Tensor | None, s: torch.Tensor, fmt: QuantFormat
) -> DoubleQuant:
    assert fmt.dq_bits is not None and fmt.group_size is not None
    rows, groups, _ = x.shape
    cols = groups * fmt.group_size
    sup = super_of_group(cols, fmt)
    kmin, kmax = -(1 << (fmt.dq_bits - 1)), (1 << (fmt.dq_bits - 1)) - 1
    d = cast_scale(super_reduce(s, sup, n_supers(cols), signed=True) / kmin, fmt)
    dg = d[:, sup]
    safe = torch.where(dg == 0, torch.ones_like(dg), dg)
    c0 = torch.clamp(torch.round(s / safe), kmin, kmax)
    table = levels(fmt, x.device)
    best_c, best_e = c0, torch.full_like(s, float("inf"))
    for delta in (0.0, -1.0, 1.0):
        c = torch.clamp(c0 + delta, kmin, kmax)
        e = _err(x, _sym_values(x, dg * c, table), a)
        better = e < best_e
        best_c = torch.where(better, c, best_c)
        best_e = torch.where(better, e, best_e)
    return DoubleQuant(d.to(scale_torch_dtype(fmt)), (best_c - kmin).to(torch.uint8))


def _pick_asym(
    x: torch.Tensor,
    a: torch.Tensor | None,
    s: torch.Tensor,
    m: torch.Tensor,
    fmt: QuantFormat,
) -> DoubleQuant:
    assert fmt.dq_bits is not None and fmt.group_size is not None
    rows, groups, _ = x.shape
    cols = groups * fmt.group_size
    sup = super_of_group(cols, fmt)
    supers = n_supers(cols)
    cmax = (1 << fmt.dq_bits) - 1
    d = cast_scale(super_reduce(s, sup, supers, signed=False) / cmax, fmt)
    dm = cast_scale(super_reduce(m, sup, supers, signed=False) / cmax, fmt)
    dg, dmg = d[:, sup], dm[:, sup]
    c0 = torch.clamp(torch.round(s / torch.where(dg == 0, 1.0, dg)), 0, cmax)
    cm0 = torch.clamp(torch.round(m / torch.where(dmg == 0, 1.0, dmg)), 0, cmax)
    best_c, best_cm = c0, cm0
    best_e = torch.full_like(s, float("inf"))
    for dc in (0.0, -1.0, 1.0):
        c = torch.clamp(c0 + dc, 0, cmax)
        for dmc in (0.0, -1.0, 1.0):
            cm = torch.clamp(cm0 + dmc, 0, cmax)
            e = _err(x, _asym_values(x, dg * c, dmg * cm, fmt.qmax), a)
            better = e < best_e
            best_c = torch.where(better, c, best_c)
            best_cm = torch.where(better, cm, best_cm)
            best_e = torch.where(better, e, best_e)
    return DoubleQuant(
        d.to(scale_torch_dtype(fmt)),
        best_c.to(torch.uint8),
        dm.to(scale_torch_dtype(fmt)),
        best_cm.to(torch.uint8),
    )


def _merge(keep_a: torch.Tensor, a: DoubleQuant, b: DoubleQuant, sup: torch.Tensor) -> DoubleQuant:
    """Per (row, super-block) ``a`` where ``keep_a`` else ``b``."""
    g = keep_a[:, sup]

    def pick(u: torch.Tensor | None, v: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        assert u is not None and v is not None
        return torch.where(mask, u, v)

    mins = codes = None
    if a.super_mins is not None:
        mins = pick(a.super_mins, b.super_mins, keep_a)
        codes = pick(a.min_codes, b.min_codes, g)
    return DoubleQuant(
        pick(a.super_scales, b.super_scales, keep_a), pick(a.scale_codes, b.scale_codes, g),
        mins, codes,
    )  # fmt: skip


def _chunk(
    w: torch.Tensor, a: torch.Tensor | None, fmt: QuantFormat, opts: MseOptions
) -> tuple[torch.Tensor, DoubleQuant]:
    assert fmt.group_size is not None
    rows, cols = w.shape
    groups = cols // fmt.group_size
    x = w.reshape(rows, groups, fmt.group_size)
    base = replace(fmt, dq_bits=None)
    s, z = mse_grid(x, a, base, opts)
    if fmt.symmetric:
        dq = _pick_sym(x, a, s, fmt)
    else:
        assert z is not None
        dq = _pick_asym(x, a, s, s * z, fmt)
    codes = weight_codes(x, dq, fmt).reshape(rows, cols)
    r_codes, r_dq = quantize_dq(w, fmt)
    sup = super_of_group(cols, fmt)
    e = _err(x, dequantize_dq(codes, dq, fmt).reshape(rows, groups, -1), a)
    e_r = _err(x, dequantize_dq(r_codes, r_dq, fmt).reshape(rows, groups, -1), a)
    supers = n_supers(cols)
    per = torch.zeros(rows, supers).index_add_(1, sup, e)
    per_r = torch.zeros(rows, supers).index_add_(1, sup, e_r)
    keep = per <= per_r
    merged = _merge(keep, dq, r_dq, sup)
    keep_w = keep[:, sup].repeat_interleave(fmt.group_size, dim=1)
    return torch.where(keep_w, codes, r_codes), merged


def mse_quantize_dq(
    w: torch.Tensor,
    fmt: QuantFormat,
    importance: torch.Tensor | None = None,
    opts: MseOptions | None = None,
) -> tuple[torch.Tensor, DoubleQuant]:
    """Unsigned codes ``[rows, cols]`` and the double-quantized scales of ``w [rows, cols]``
    chosen by the (importance-weighted) error, as :func:`mpq.quant.dq.quantize_dq` returns them."""
    assert fmt.dq_bits is not None and fmt.group_size is not None
    opts = opts or MseOptions()
    x = w.detach().float()
    rows, cols = x.shape
    a = importance_weights(importance, cols, cols // fmt.group_size)
    if a is not None:
        a = a.to(x.device)
    codes, parts = [], []
    for r0 in range(0, rows, _ROW_CHUNK):
        c, dq = _chunk(x[r0 : r0 + _ROW_CHUNK], a, fmt, opts)
        codes.append(c)
        parts.append(dq)

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat([t for t in ts if t is not None])

    return torch.cat(codes), DoubleQuant(
        torch.cat([p.super_scales for p in parts]),
        torch.cat([p.scale_codes for p in parts]),
        cat([p.super_mins for p in parts]),
        cat([p.min_codes for p in parts]),
    )
