"""The ``mse`` method: per group, the grid that minimizes the (importance-weighted) error.

For every group of ``n`` weights ``w`` with per-column weights ``a`` (the layer's importance
``E[x_j^2]`` over calibration inputs, llama.cpp's imatrix, when given; 1 otherwise) it
minimizes ``sum_j a_j (w_j - deq_j)^2`` over the format's scale (and zero-point), in the manner
of llama.cpp's ``make_qx_quants`` / ``make_qkx2_quants``:

1. **candidates**: scales around the min/max rule. Symmetric: the signed absmax ``m`` mapped to
   the most negative level times ``f`` and to the most positive level times ``f``, for ``f`` in
   ``MseOptions.factors`` (``f > 1`` clips the largest weight). Asymmetric: ``s = (max - min) /
   (2^b - 1 + r)`` for ``r`` in ``MseOptions.shifts``, zero-point from the minimum.
2. for each candidate, the nearest codes, then the least-squares scale for those codes
   (asymmetric: scale and offset by a 2x2 solve, the offset rounded to an integer zero-point
   and the scale re-fitted); the candidate with the least error wins;
3. ``iters`` alternations (scale rounded to its dtype, codes re-rounded, scale re-fitted);
4. the round-to-nearest grid is kept wherever it is better, so ``mse`` never has a larger
   (weighted) error than ``rtn`` on any group.

Everything is batched over rows, groups and candidates (chunks of rows bound the memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.errors import MpqError
from mpq.formats import QuantFormat, matrix_shape
from mpq.quant.core import (
    QuantizedTensor,
    grid_values,
    grouped,
    levels,
    pack_result,
    round_scale,
    symmetric_values,
)
from mpq.quant.rtn import grid_codes, rtn_grid, signed_absmax

_CHUNK_ELEMENTS = 1 << 21  # candidates x rows x cols per batch (float32: 8 MiB per temporary)


@dataclass(frozen=True)
class MseOptions:
    """Candidate grids of the search (see the module docstring)."""

    factors: tuple[float, ...] = tuple(0.70 + 0.05 * i for i in range(13))  # 0.70 .. 1.30
    shifts: tuple[float, ...] = tuple(-1.0 + 0.2 * i for i in range(16))  # -1.0 .. 2.0
    iters: int = 2

    def __post_init__(self) -> None:
        if not self.factors or min(self.factors) <= 0:
            raise MpqError(f"mse factors {self.factors} must be positive and non-empty")
        if not self.shifts or self.iters < 0:
            raise MpqError("mse shifts must be non-empty and iters >= 0")


def importance_weights(
    importance: torch.Tensor | None, cols: int, groups: int
) -> torch.Tensor | None:
    """Per-column error weights ``[groups, n]`` (mean 1; None without importance)."""
    if importance is None:
        return None
    imp = importance.detach().to(torch.float32).reshape(-1)
    if imp.numel() != cols:
        raise MpqError(
            f"importance has {imp.numel()} entries, the layer has {cols} input columns; "
            f"collect it from this layer's inputs"
        )
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise MpqError("importance must be finite and non-negative (a mean of squares)")
    mean = float(imp.mean())
    a = imp / mean if mean > 0 else torch.ones_like(imp)
    return a.reshape(groups, cols // groups)


def _weighted_err(w: torch.Tensor, deq: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    d = (w - deq) ** 2
    return (d if a is None else a * d).sum(-1)


def _sym_fit(
    w: torch.Tensor,
    aw: torch.Tensor,
    a: torch.Tensor | None,
    scale: torch.Tensor,
    fmt: QuantFormat,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(least-squares scale for the nearest levels at ``scale``, the error it removes: the
    weighted error is ``sum a w^2`` minus this gain). ``aw = a * w``."""
    v = symmetric_values(w, scale, fmt)
    sxv = (aw * v).sum(-1)
    vv = v * v
    svv = (vv if a is None else a * vv).sum(-1)
    ok = svv > 0
    safe = torch.where(ok, svv, 1.0)
    best = torch.where(ok, sxv / safe, scale)
    gain = torch.where(ok, sxv * sxv / safe, 0.0)
    return best, gain


def _sym_search(
    w: torch.Tensor, a: torch.Tensor | None, fmt: QuantFormat, opts: MseOptions
) -> torch.Tensor:
    table = levels(fmt, w.device)
    m = signed_absmax(w)
    aw = w if a is None else a * w
    f = torch.tensor(opts.factors, dtype=torch.float32)
    ends = torch.stack([f * float(table[0]), f * float(table[-1])]).reshape(-1)
    cand = m[None] / ends.reshape(-1, *([1] * m.dim()))  # [C, rows, groups]
    cand = torch.where(cand == 0, 1.0, cand)
    fitted, gain = _sym_fit(w[None], aw[None], a, cand, fmt)
    pick = gain.argmax(dim=0, keepdim=True)
    scale = torch.gather(fitted, 0, pick)[0]
    for _ in range(opts.iters):
        scale, _ = _sym_fit(w, aw, a, round_scale(scale, fmt), fmt)
    return round_scale(scale, fmt)


def _asym_fit(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    a: torch.Tensor,
    fmt: QuantFormat,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes at (scale, zero), then least squares ``w ~ s q + m``, ``z = round(-m / s)`` and
    ``s`` re-fitted for that integer ``z``: (scale, zero, weighted error)."""
    qmax = (1 << fmt.bits) - 1
    q = grid_codes(w, scale, zero, fmt).to(torch.float32)
    sa = a.sum(-1).expand_as(scale)
    sq = (a * q).sum(-1)
    sqq = (a * q * q).sum(-1)
    sw = (a * w).sum(-1)
    swq = (a * w * q).sum(-1)
    det = sa * sqq - sq * sq
    ok = det > 1e-12 * (sa * sqq).clamp_min(1e-30)
    safe = torch.where(ok, det, 1.0)
    s_ls = (sa * swq - sq * sw) / safe
    m_ls = (sqq * sw - sq * swq) / safe
    good = ok & (s_ls > 0)
    s_new = torch.where(good, s_ls, scale)
    z_new = torch.where(good, torch.clamp(torch.round(-m_ls / s_new), 0, qmax), zero)
    d = q - z_new[..., None]
    sdd = (a * d * d).sum(-1)
    refit = (a * w * d).sum(-1) / torch.where(sdd > 0, sdd, 1.0)
    s_new = torch.where((sdd > 0) & (refit > 0), refit, s_new)
    err = _weighted_err(w, d * s_new[..., None], a)
    return s_new, z_new, err


def _asym_search(
    w: torch.Tensor, a: torch.Tensor, fmt: QuantFormat, opts: MseOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = (1 << fmt.bits) - 1
    lo = w.amin(dim=-1).clamp_max(0.0)
    hi = w.amax(dim=-1).clamp_min(0.0)
    r = torch.tensor(opts.shifts, dtype=torch.float32).reshape(-1, *([1] * lo.dim()))
    cand = ((hi - lo)[None] / (qmax + r)).clamp_min(torch.finfo(torch.float32).tiny)
    zc = torch.clamp(torch.round(-lo[None] / cand), 0, qmax)
    s, z, err = _asym_fit(w[None], cand, zc, a, fmt)
    pick = err.argmin(dim=0, keepdim=True)
    scale = torch.gather(s, 0, pick)[0]
    zero = torch.gather(z, 0, pick)[0]
    for _ in range(opts.iters):
        scale, zero, _ = _asym_fit(w, round_scale(scale, fmt), zero, a, fmt)
    return round_scale(scale, fmt), zero


def mse_grid(
    w: torch.Tensor,
    a: torch.Tensor | None,
    fmt: QuantFormat,
    opts: MseOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero-points of grouped ``w [rows, groups, n]`` with error weights
    ``a [groups, n]`` (None: unweighted): the searched grid, or the rtn grid where that is
    better."""
    opts = opts or MseOptions()
    rows = w.shape[0]
    per_row = w[0].numel() * (2 * len(opts.factors) + len(opts.shifts))
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    scales, zeros = [], []
    for r0 in range(0, rows, step):
        wc = w[r0 : r0 + step]
        if fmt.symmetric:
            s, z = _sym_search(wc, a, fmt, opts), None
        else:
            ones = torch.ones(wc.shape[1:], device=wc.device) if a is None else a
            s, z = _asym_search(wc, ones, fmt, opts)
        s0, z0 = rtn_grid(wc, fmt)
        table = None if z is not None else levels(fmt, wc.device)
        e = _weighted_err(wc, _deq(wc, s, z, fmt, table), a)
        e0 = _weighted_err(wc, _deq(wc, s0, z0, fmt, table), a)
        better = e < e0
        scales.append(torch.where(better, s, s0))
        if z is not None and z0 is not None:
            zeros.append(torch.where(better, z, z0))
    return torch.cat(scales), (torch.cat(zeros) if zeros else None)


def _deq(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    fmt: QuantFormat,
    table: torch.Tensor | None,
) -> torch.Tensor:
    codes = grid_codes(w, scale, zero, fmt)
    return grid_values(codes, scale[..., None], None if zero is None else zero[..., None], table)


def mse_quantize(
    weight: torch.Tensor,
    fmt: QuantFormat,
    importance: torch.Tensor | None = None,
    opts: MseOptions | None = None,
) -> QuantizedTensor:
    """``weight`` (any shape) quantized to ``fmt`` by the ``mse`` search; ``importance``
    ``[cols]`` (mean of x^2 per input column) weights the error, or None for plain MSE."""
    shape = tuple(weight.shape)
    _, cols = matrix_shape(shape)
    w = grouped(weight, fmt)
    a = importance_weights(importance, cols, w.shape[1])
    if a is not None:
        a = a.to(w.device)
    scale, zero = mse_grid(w, a, fmt, opts)
    return pack_result(grid_codes(w, scale, zero, fmt), scale, zero, shape, fmt)
