"""Modules that hold packed low-bit weights and run them with the pure-torch reference path.

Each quantized module stores exactly the tensors the cost model counts: ``qweight`` (int32 words,
one packed row per output channel, see :mod:`mpq.kernels.packing`), ``scales`` (``[rows, groups]``
in the format's scale dtype) and, for asymmetric formats, ``qzeros`` (one packed stream of
``rows * groups`` zero-points). A weight kept at 16 bits is a float16 ``weight`` buffer.
The forward pass dequantizes to the input's dtype and calls the ordinary torch op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpq.formats import QuantFormat
from mpq.kernels.packing import pack, unpack
from mpq.quantize import dequantize_codes, keep_weight, matrix_shape, quantize


class PackedWeight(nn.Module):
    """Packed storage of one weight and its reference dequantization."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, fmt: QuantFormat) -> None:
        super().__init__()
        self.fmt = fmt
        self.shape = tuple(weight.shape)
        self.rows, self.cols = matrix_shape(self.shape)
        if fmt.keep:
            self.register_buffer("weight", keep_weight(weight))
            return
        qt = quantize(weight, fmt)
        self.register_buffer("qweight", pack(qt.codes, fmt.bits))
        self.register_buffer("scales", qt.scales)
        if qt.zeros is not None:
            self.register_buffer("qzeros", pack(qt.zeros.reshape(1, -1), fmt.bits))
        else:
            self.qzeros = None

    def zeros(self) -> torch.Tensor | None:
        if self.qzeros is None:
            return None
        groups = self.scales.shape[1]
        return unpack(self.qzeros, self.fmt.bits, self.rows * groups).reshape(self.rows, groups)

    def dequantize_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 matrix ``[len(rows), cols]`` (all rows when ``rows`` is None)."""
        if self.fmt.keep:
            w = self.weight.reshape(self.rows, self.cols)
            return (w if rows is None else w[rows]).float()
        qweight = self.qweight if rows is None else self.qweight[rows]
        scales = self.scales if rows is None else self.scales[rows]
        zeros = self.zeros()
        if zeros is not None and rows is not None:
            zeros = zeros[rows]
        codes = unpack(qweight, self.fmt.bits, self.cols)
        return dequantize_codes(codes, scales, zeros, self.fmt)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows().reshape(self.shape).to(dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, format={self.fmt.spec()}"


class QuantLinear(nn.Module):
    """``nn.Linear`` with a packed weight (reference backend)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = packed
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )
        self.backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.packed.dequantize(x.dtype), self.bias)


class QuantConv2d(nn.Module):
    """``nn.Conv2d`` with a packed weight (reference backend)."""

    def __init__(self, packed: PackedWeight, conv: nn.Conv2d) -> None:
        super().__init__()
        self.packed = packed
        self.bias = (
            nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
            if conv.bias is not None
            else None
        )
        self.conv_args: dict[str, Any] = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
        }
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported")
        self.backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.packed.dequantize(x.dtype), self.bias, **self.conv_args)


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` with a packed table; only the looked-up rows are dequantized."""

    def __init__(self, packed: PackedWeight, emb: nn.Embedding) -> None:
        super().__init__()
        self.packed = packed
        self.padding_idx = emb.padding_idx
        self.backend = "reference"
        if emb.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm is not supported")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.packed.dequantize_rows(flat)
        return rows.reshape(*ids.shape, self.packed.cols)
