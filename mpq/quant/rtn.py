"""Round to nearest on the min/max grid (pure functions).

Symmetric (any grid, llama.cpp's Q4_0 rule): the signed value ``m`` of largest magnitude in a
group maps to the most negative level, ``s = m / levels[0]`` (``levels[0] = -2^(b-1)`` for the
int grid: ``s = m / -8`` at 4 bits, so no level is wasted), then every weight takes its nearest
level. Asymmetric: ``s = (max - min) / (2^b - 1)`` over the range widened to include 0,
``z = clamp(round(-min / s), 0, 2^b - 1)``, ``code = clamp(round(w / s) + z, 0, 2^b - 1)``.
Scales are rounded to the scale dtype *before* the codes are computed, so dequantizing gives
exactly what a deployed kernel computes.
"""

from __future__ import annotations

import torch

from mpq.formats import QuantFormat
from mpq.quant.core import (
    QuantizedTensor,
    asymmetric_codes,
    grouped,
    levels,
    pack_result,
    round_scale,
    symmetric_codes,
)


def signed_absmax(w: torch.Tensor) -> torch.Tensor:
    """Per group (last dim) the value of largest magnitude, with its sign (first one on ties)."""
    idx = w.abs().argmax(dim=-1, keepdim=True)
    return torch.gather(w, -1, idx)[..., 0]


def rtn_grid(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (at the scale dtype's values) and zero-points (asymmetric) of ``w [..., n]``."""
    if fmt.symmetric:
        first = float(levels(fmt)[0])
        return round_scale(signed_absmax(w) / first, fmt), None
    qmax = (1 << fmt.bits) - 1
    lo = w.amin(dim=-1).clamp_max(0.0)
    hi = w.amax(dim=-1).clamp_min(0.0)
    scale = round_scale((hi - lo) / qmax, fmt)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def grid_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat
) -> torch.Tensor:
    """Nearest codes of ``w [..., n]`` on a given grid."""
    if zero is None:
        return symmetric_codes(w, scale, fmt)
    return asymmetric_codes(w, scale, zero, fmt)


def rtn_quantize(weight: torch.Tensor, fmt: QuantFormat) -> QuantizedTensor:
    """Round-to-nearest quantization of ``weight`` (any shape) to ``fmt`` (not keep)."""
    w = grouped(weight, fmt)
    scale, zero = rtn_grid(w, fmt)
    return pack_result(grid_codes(w, scale, zero, fmt), scale, zero, tuple(weight.shape), fmt)
