"""The fused CPU backend: torch's int8 / int4 weight-only matmul ops where the format allows.

What each op accepts (torch 2.13, checked by ``tests/test_kernels_cpu.py``):

- ``aten._weight_int8pack_mm(x [M, K], w int8 [N, K] contiguous, scales [N])``: per output
  channel scales in ``x``'s dtype (float32, float16, bfloat16); no zero-points, no groups.
  Used for **8-bit per-channel** formats. The stored 8-bit field is ``code - 128`` as int8
  (:mod:`mpq.kernels.packing`), so ``qweight.view(torch.int8)`` is the op's weight with no copy
  when ``cols % 4 == 0`` (a contiguous int8 copy is made otherwise). Symmetric: ``y = op(x, q,
  s)``. Asymmetric: ``(code - z) s = field s + (128 - z) s``, so ``y = op(x, field, s) +
  sum_k(x) (128 - z) s`` (one rank-1 correction).
- ``aten._weight_int4pack_mm_for_cpu(x [M, K], w, group, scale_and_zero [K/group, N, 2])``
  with ``w = aten._convert_weight_to_int4pack_for_cpu(codes int32 [N, K], 2)`` (an ISA-specific
  uint8 ``[N, K/2]`` layout), ``group`` in {32, 64, 128, 256}, ``N % 16 == 0``; it computes
  ``w = (code - 8) * scale + zero``. Used for **4-bit** formats with one of those group sizes,
  or per channel when some of them divides ``K`` (the channel scale is repeated per group):
  ``zero = (8 - z) * scale`` (``z = 8`` when symmetric). The repacked codes are an extra
  runtime copy of ``N*K/2`` bytes (the op's layout is not ours); scale/zero pairs are built from
  the stored scales at each call, not kept.

Both ops cost about one weight pass per input row, so above ``FUSED_MAX_M`` rows (prefill) the
layer dequantizes once and calls ``F.linear`` instead (measured on a 2-core AVX-512 EPYC: the
fused ops win at 1 row, lose from about 8 rows on).

4-bit ``:dq`` formats (:mod:`mpq.quant.dq`) use the int4 op too, with their float32 group scales and
the offset ``0`` (symmetric) or ``8 * scale - min`` (asymmetric).

Every other format (2, 3, 5, 6, 7 bits, grouped 8-bit, N not a multiple of 16, the ``nl`` and
``nf4`` level tables, ...) runs the
reference path (dequantize, then ``F.linear``), and the module reports ``backend="reference"``.
Dequantization is exact in both ops; only the accumulation order differs from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.kernels.backends import REFERENCE_KERNEL, Backend, KernelChoice

if TYPE_CHECKING:
    from mpq.kernels.modules import PackedWeight, QuantLinear

INT4_GROUPS = (32, 64, 128, 256)
# The ops work row by row (their cost grows linearly with the rows of x): above this many rows
# the backend dequantizes once and calls F.linear (BLAS) instead, like the reference.
FUSED_MAX_M = 4
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CpuKernel:
    """Which fused op runs a layer: ``op`` is ``"int8"`` or ``"int4"``; ``group`` the op's group."""

    op: str
    group: int

    def describe(self) -> str:
        if self.op == "int8":
            return "aten._weight_int8pack_mm"
        return f"aten._weight_int4pack_mm_for_cpu(group={self.group})"


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def choose(fmt: QuantFormat, rows: int, cols: int) -> CpuKernel | None:
    """The fused op for a ``[rows, cols]`` weight in ``fmt``, or None (reference path)."""
    if fmt.keep or fmt.grid != "int":  # level tables (nl, nf4) run the reference path
        return None
    if fmt.bits == 8 and fmt.group_size is None and _has_op("_weight_int8pack_mm"):
        return CpuKernel("int8", cols)
    if fmt.bits == 4 and rows % 16 == 0 and _has_op("_weight_int4pack_mm_for_cpu"):
        if fmt.group_size in INT4_GROUPS:
            return CpuKernel("int4", fmt.group_size)
        if fmt.group_size is None:
            for g in sorted(INT4_GROUPS, reverse=True):
                if cols % g == 0:
                    return CpuKernel("int4", g)
    return None


def int8_weight(qweight: torch.Tensor, cols: int) -> torch.Tensor:
    """The stored 8-bit fields as an int8 ``[rows, cols]`` matrix (a view when possible)."""
    w = qweight.view(torch.int8)
    return w if w.shape[1] == cols else w[:, :cols].contiguous()


def int4_weight(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``[rows, cols]`` in the int4 op's packed layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def linear_int8(
    x2: torch.Tensor,
    w8: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
) -> torch.Tensor:
    """``x2 [M, K]`` times the 8-bit per-channel weight (fields ``w8``, scales ``[N, 1]``)."""
    s = scales[:, 0].to(x2.dtype)
    y = torch.ops.aten._weight_int8pack_mm(x2, w8, s)
    if zeros is not None:
        corr = (128.0 - zeros[:, 0].float()) * scales[:, 0].float()
        y = y + x2.sum(dim=1, keepdim=True) * corr.to(x2.dtype)
    return y


def linear_int4(
    x2: torch.Tensor,
    w4: torch.Tensor,
    kernel: CpuKernel,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    cols: int,
    *,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x2 [M, K]`` times the 4-bit weight repacked by :func:`int4_weight`. ``offsets``
    (float ``[N, groups]``) replaces the zero-point term: ``w = (code - 8) * scale + offset``
    (``:dq`` formats: 0 when symmetric, ``8 * scale - min`` when asymmetric)."""
    s = scales.float()
    z = torch.full_like(s, 8.0) if zeros is None else zeros.float()
    off = (8.0 - z) * s if offsets is None else offsets.float()
    n_op = cols // kernel.group
    if s.shape[1] != n_op:  # per channel: repeat the channel's scale for every op group
        s = s.expand(-1, n_op)
        off = off.expand(-1, n_op)
    sz = torch.stack([s, off], dim=-1).transpose(0, 1).contiguous().to(x2.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w4, kernel.group, sz)


@dataclass(frozen=True)
class CpuBackend(Backend):
    """The ``cpu`` backend: torch's fused int8 / int4 CPU ops where the format allows
    (:func:`choose`); the reference path otherwise, and the layer then reports ``reference``."""

    def prepare(self, packed: PackedWeight) -> KernelChoice:
        k = choose(packed.fmt, packed.rows, packed.cols)
        if k is None:
            return REFERENCE_KERNEL
        buffers = {}
        if k.op == "int4":
            buffers["_cpu_w4"] = int4_weight(packed.codes())
        elif packed.cols % 4 != 0:
            buffers["_cpu_w8"] = int8_weight(packed.qweight, packed.cols)
        describe = f"{k.describe()} (<= {FUSED_MAX_M} rows; else dequantize + F.linear)"
        return KernelChoice("cpu", describe, buffers, k)

    def linear(self, layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
        p = layer.packed
        if x2.dtype not in DTYPES:
            raise MpqError(
                f"{layer.layer_name}: backend 'cpu' needs a float input (float32, float16, "
                f"bfloat16), got {x2.dtype}"
            )
        if x2.device.type != "cpu":
            raise MpqError(
                f"{layer.layer_name}: backend 'cpu' runs CPU tensors, the input is on "
                f"{x2.device}; use backend 'triton', 'cupy' or 'auto'"
            )
        if x2.shape[0] > FUSED_MAX_M:  # the ops are GEMV-like: large batches dequantize
            return super().linear(layer, x2)
        k: CpuKernel = layer.kernel_choice.state
        x2 = x2.contiguous()
        if k.op == "int8":
            w8 = layer._buffers.get("_cpu_w8")
            w8 = w8 if w8 is not None else int8_weight(p.qweight, p.cols)
            y = linear_int8(x2, w8, p.scales, p.zeros())
        else:
            w4 = layer._buffers["_cpu_w4"]
            assert w4 is not None
            if p.fmt.dq_bits is not None:
                s, m = p.group_scales()
                off = torch.zeros_like(s) if m is None else 8.0 * s - m
                y = linear_int4(x2, w4, k, s, None, p.cols, offsets=off)
            else:
                y = linear_int4(x2, w4, k, p.scales, p.zeros(), p.cols)
        return y if layer.bias is None else y + layer.bias.to(y.dtype)


BACKEND = CpuBackend("cpu")
