"""The tolerance a kernel's matmul is held to against the reference.

All backends dequantize to exactly the reference's float32 weights (``(code - z) * scale``);
what differs is the order of the ``K`` multiply-adds. The standard bound for a dot product of
length ``K`` accumulated in a float format with unit roundoff ``u`` is
``|y - y_exact| <= K u sum_k |x_k w_k|`` (Higham, Accuracy and Stability, eq. 3.5, to first
order). Two implementations each within it differ by at most twice that; :func:`matmul_bound`
returns ``2 (K u_acc + u_out) (|x| @ |W|^T)`` elementwise, ``u_out`` for the final rounding to
the output dtype, plus a tiny absolute floor for all-zero rows.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


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
