"""Fake quantization of layer inputs (activation bits of W+A plans).

A format's ``act_bits`` (16 = off) is applied to the input of the quantized layer, in its
forward, before the matmul: ``x -> dequant(quant(x))``. The quantizer is dynamic (its range is
read from the tensor at run time, as W8A8/W4A8 inference kernels do) and by default:

- **per token**: one scale (and zero-point) per token, i.e. per row of the ``[..., features]``
  input of a Linear layer, reduced over the features; for a Conv2d input ``[N, C, H, W]`` one
  per pixel, reduced over the channels. ``granularity="tensor"`` uses one for the whole tensor.
- **asymmetric**: ``s = (max - min) / (2^b - 1)`` with the range widened to include 0 (so 0 is
  exact), integer zero-point ``z = clamp(round(-min / s), 0, 2^b - 1)``,
  ``q = clamp(round(x / s) + z, 0, 2^b - 1)``, dequantized ``(q - z) * s``. ``symmetric=True``
  uses ``s = max|x| / (2^(b-1) - 1)`` and ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``.

Scales stay in float32 (float64 for float64 inputs; they are computed at run time and never
stored). Embedding inputs are
token ids and are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.errors import MpqError
from mpq.formats import ACT_BITS, KEEP_BITS

GRANULARITIES = ("token", "tensor")


@dataclass(frozen=True)
class ActQuant:
    """How layer inputs are fake-quantized when a format has ``act_bits < 16``."""

    granularity: str = "token"
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise MpqError(
                f"activation granularity {self.granularity!r} is unknown; "
                f"use one of {list(GRANULARITIES)}"
            )


DEFAULT_ACT_QUANT = ActQuant()


def fake_quant_act(
    x: torch.Tensor,
    bits: int,
    *,
    granularity: str = "token",
    symmetric: bool = False,
    channel_dim: int = -1,
) -> torch.Tensor:
    """``x`` quantized to ``bits`` and dequantized, in ``x``'s dtype (``bits == 16``: ``x``).

    ``channel_dim`` is the feature dimension a token's scale is shared over (``-1`` for Linear
    inputs, ``1`` for NCHW convolution inputs).
    """
    if bits not in ACT_BITS:
        raise MpqError(f"act_bits={bits} is not supported: use one of {list(ACT_BITS)}")
    if granularity not in GRANULARITIES:
        raise MpqError(f"granularity {granularity!r} is unknown; use one of {list(GRANULARITIES)}")
    if bits == KEEP_BITS or x.numel() == 0:
        return x
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if granularity == "tensor":
        dims: tuple[int, ...] = tuple(range(xf.dim()))
    else:
        dims = (channel_dim % xf.dim(),)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = (xf.abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(tiny)
        q = torch.clamp(torch.round(xf / scale), -qmax - 1, qmax)
        out = q * scale
    else:
        qmax = (1 << bits) - 1
        lo = xf.amin(dim=dims, keepdim=True).clamp_max(0.0)
        hi = xf.amax(dim=dims, keepdim=True).clamp_min(0.0)
        scale = ((hi - lo) / qmax).clamp_min(tiny)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = torch.clamp(torch.round(xf / scale) + zero, 0, qmax)
        out = (q - zero) * scale
    return out.to(x.dtype)


def apply_act_quant(
    x: torch.Tensor, bits: int, cfg: ActQuant, channel_dim: int = -1
) -> torch.Tensor:
    """:func:`fake_quant_act` with the settings of ``cfg``."""
    return fake_quant_act(
        x, bits, granularity=cfg.granularity, symmetric=cfg.symmetric, channel_dim=channel_dim
    )
