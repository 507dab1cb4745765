"""What every kernel launch is checked against, and the error bound kernels are tested against.

Launch checks (shared by :mod:`.triton_kernels` and :mod:`.cupy_backend`, and by
:mod:`.backends` when it decides which backend can run a layer): :class:`KernelOperands`
bundles the packed tensors one launch reads; :meth:`KernelOperands.check` raises
:class:`~mpq.errors.MpqError` naming the problem and the fix when the tensors do not have the
layout of :mod:`mpq.kernels.packing` (shape, dtype, device), when the input is on a device the
backend cannot run, or when the offsets would not fit the kernels' int32 index arithmetic
(:func:`offsets_problem`). Nothing here imports triton or cupy.

Error bound: all backends dequantize to exactly the reference's float32 weights
(``(code - z) * scale``); what differs is the order of the ``K`` multiply-adds. The standard
bound for a dot product of length ``K`` accumulated in a float format with unit roundoff ``u``
is ``|y - y_exact| <= K u sum_k |x_k w_k|`` (Higham, Accuracy and Stability, eq. 3.5, to first
order). Two implementations each within it differ by at most twice that; :func:`matmul_bound`
returns ``2 (K u_acc + u_out) (|x| @ |W|^T)`` elementwise, ``u_out`` for the final rounding to
the output dtype, plus a tiny absolute floor for all-zero rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mpq.errors import MpqError
from mpq.kernels.backends import get
from mpq.kernels.packing import offsets_problem

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreted() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_problem(backend: str, device: torch.device) -> str | None:
    """Why ``backend``'s kernels cannot run tensors on ``device`` (with the fix), or None."""
    return get(backend).device_problem(device)


@dataclass(frozen=True)
class KernelOperands:
    """The tensors one kernel launch reads, in the layout of :mod:`mpq.kernels.packing`.

    ``qweight [rows, words]`` int32, ``scales [rows, groups]`` (float16/bfloat16/float32),
    ``qzeros`` (asymmetric: one packed stream of ``rows * groups`` zero-points; None when
    symmetric), ``bias [rows]`` or None, ``bits`` (2..8), ``cols`` (``K``), ``group`` (columns
    per scale; ``cols`` when per channel).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    bias: torch.Tensor | None
    bits: int
    cols: int
    group: int

    @property
    def rows(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def words(self) -> int:
        """32-bit words per packed row."""
        return int(self.qweight.shape[1])

    @property
    def groups(self) -> int:
        """Scales per row."""
        return int(self.scales.shape[1])

    @property
    def asym(self) -> bool:
        return self.qzeros is not None

    @property
    def zeros_arg(self) -> torch.Tensor:
        """The zero-point pointer to pass: ``qzeros``, or ``qweight`` as a never-read placeholder
        when symmetric (kernels take a pointer either way)."""
        return self.qzeros if self.qzeros is not None else self.qweight

    def layout_problem(self) -> str | None:
        """Why the tensors are not the packed layout of a ``[rows, cols]`` weight, or None."""
        if not 2 <= self.bits <= 8:
            return f"bits={self.bits}: the kernels run widths 2..8"
        if self.cols < 1 or self.group < 1 or self.cols % self.group != 0:
            return f"group {self.group} does not divide the row length {self.cols}"
        q, s = self.qweight, self.scales
        rows, groups = (q.shape[0] if q.dim() == 2 else -1), self.cols // self.group
        want: dict[str, tuple[torch.Tensor, torch.dtype | None, tuple[int, ...]]] = {
            "qweight": (q, torch.int32, (rows, -(-self.cols * self.bits // 32))),
            "scales": (s, None, (rows, groups)),
        }
        if self.qzeros is not None:
            want["qzeros"] = (self.qzeros, torch.int32, (1, -(-rows * groups * self.bits // 32)))
        if self.bias is not None:
            want["bias"] = (self.bias, None, (rows,))
        for name, (t, dtype, shape) in want.items():
            if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
                return (
                    f"{name} is {t.dtype} {list(t.shape)}, expected "
                    f"{dtype or 'float'} {list(shape)} for {self.bits}-bit codes of {self.cols} "
                    f"columns in groups of {self.group}; pack it with mpq.kernels.packing"
                )
        if s.dtype not in FLOAT_DTYPES:
            return f"scales are {s.dtype}; use float32, float16 or bfloat16"
        loose = [n for n, (t, _, _) in want.items() if not t.is_contiguous()]
        if loose:
            return f"not contiguous: {', '.join(loose)}; call .contiguous() on them"
        devices = {t.device for t in (q, s, self.qzeros, self.bias) if t is not None}
        if len(devices) > 1:
            return f"the packed tensors are on several devices ({sorted(map(str, devices))})"
        return None

    def check(self, backend: str, x2: torch.Tensor | None = None) -> None:
        """Raise :class:`MpqError` when ``backend`` cannot launch on these operands (and input
        ``x2 [M, K]`` when given): device, layout, input dtype and width, int32 offsets."""
        device = self.qweight.device if x2 is None else x2.device
        problem = device_problem(backend, device)
        if problem is None:
            detail = self.layout_problem()
            if detail is None and x2 is not None:
                detail = _input_detail(x2, self.cols, self.qweight.device)
            if detail is None:
                # Triton indexes activations with int32; cupy's kernel with 64-bit offsets.
                wide = get(backend).int32_activations
                batch = x2.shape[0] if x2 is not None and wide else 0
                detail = offsets_problem(self.rows, self.cols, self.bits, self.groups, batch)
            if detail is not None:
                problem = f"the {backend} kernels cannot run it: {detail}"
        if problem is not None:
            raise MpqError(problem)


def _input_detail(x2: torch.Tensor, cols: int, device: torch.device) -> str | None:
    """What is wrong with a matmul input ``x2`` for a weight of ``cols`` columns on ``device``."""
    if x2.dtype not in FLOAT_DTYPES:
        return f"the input is {x2.dtype}; use float32, float16 or bfloat16"
    if x2.dim() != 2 or x2.shape[1] != cols:
        return f"the input has shape {list(x2.shape)}, expected [M, {cols}]"
    if x2.device != device:
        return f"the input is on {x2.device}, the weight on {device}; move them to one device"
    return None


def matmul_bound(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    acc_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elementwise bound on ``|kernel(x) - reference(x)|`` for ``x [M, K] @ w [N, K]^T + b``."""
    k = x.shape[-1] + (bias is not None)
    u = 2 * (k * UNIT_ROUNDOFF[acc_dtype] + UNIT_ROUNDOFF[out_dtype])
    mag = x.abs().double() @ w.abs().double().T
    if bias is not None:
        mag = mag + bias.abs().double()
    return u * mag + 1e-30


def max_violation(y: torch.Tensor, y_ref: torch.Tensor, bound: torch.Tensor) -> float:
    """Largest ``|y - y_ref| / bound`` (<= 1 means within the bound)."""
    err = (y.double() - y_ref.double()).abs()
    return float((err / bound).max()) if err.numel() else 0.0
