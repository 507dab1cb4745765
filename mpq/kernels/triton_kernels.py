"""Triton kernels that read the packed layout of :mod:`mpq.kernels.packing` directly.

Three kernels, for any width 2..8, any group size (or per channel), symmetric or asymmetric,
float16/bfloat16/float32 scales and inputs:

- :func:`gemv`: batch 1 (decode) and tiny batches (``M <= GEMV_MAX_M``). One program per
  ``BLOCK_N`` output rows and input row; it walks ``K`` in ``BLOCK_K`` steps, extracts each code
  from its word (and the next word when the code straddles two, only for widths that do not
  divide 32), dequantizes ``(code - z) * scale`` in float32 and accumulates ``w * x`` in float32.
- :func:`gemm`: larger batches; ``BLOCK_M x BLOCK_N`` tiles, the weight tile dequantized in
  registers to the input dtype and multiplied with ``tl.dot`` (float32 inputs use
  ``input_precision="ieee"``), float32 accumulator.
- :func:`dequantize`: the whole weight to a dense matrix (for checks and for a dequantize +
  cuBLAS path); bit-exact with :meth:`mpq.kernels.modules.PackedWeight.dequantize`.

Block sizes are fixed, not autotuned (autotune does not run under ``TRITON_INTERPRET=1`` and no
GPU was available to tune on). Indices are int32: :func:`shape_problem` refuses weights whose
packed offsets would not fit. Only the Triton API shared by Triton 3.6 and 3.7 is used.
"""

from __future__ import annotations

import os

import torch
import triton  # type: ignore[import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-untyped, unused-ignore]

GEMV_MAX_M = 4
GEMV_BLOCK_N = 16
GEMV_BLOCK_K = 256
GEMM_BLOCK_M = 32
GEMM_BLOCK_N = 64
GEMM_BLOCK_K = 32
DEQ_BLOCK_N = 16
DEQ_BLOCK_K = 128
INT32_MAX = 2**31 - 1


def interpreted() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def shape_problem(rows: int, cols: int, bits: int, groups: int, batch: int = 1) -> str | None:
    """Why the kernels cannot index a ``[rows, cols]`` weight (int32 offsets), or None."""
    words = -(-cols * bits // 32)
    if rows * words > INT32_MAX or rows * groups * bits > INT32_MAX:
        return f"{rows}x{cols} at {bits} bits needs offsets beyond int32"
    if max(batch, 1) * max(rows, cols) > INT32_MAX:
        return f"a batch of {batch} rows of {max(rows, cols)} values needs offsets beyond int32"
    return None


@triton.jit
def _field(base, idx, BITS: tl.constexpr, mask):  # type: ignore[no-untyped-def]
    """The BITS-bit field number ``idx`` of the little-endian bit stream at ``base`` (int32)."""
    off = idx * BITS
    word = off // 32
    sh = (off % 32).to(tl.uint32)
    v = tl.load(base + word, mask=mask, other=0).to(tl.uint32, bitcast=True) >> sh
    if 32 % BITS != 0:
        spill = mask & ((off % 32) + BITS > 32)
        hi = tl.load(base + word + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
        # (32 - sh) % 32 keeps the shift in [0, 31]; hi is 0 where the code does not spill.
        v = v | (hi << ((32 - sh) % 32))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dequant_tile(  # type: ignore[no-untyped-def]
    qw_ptr,
    s_ptr,
    qz_ptr,
    rn,
    rk,
    mask,
    W,
    G,
    GS,
    BITS: tl.constexpr,
    ASYM: tl.constexpr,
):
    """Float32 weights at rows ``rn`` and columns ``rk`` (broadcast shapes), zero off ``mask``."""
    field = _field(qw_ptr + rn * W, rk, BITS, mask)
    g = rk // GS
    s = tl.load(s_ptr + rn * G + g, mask=mask, other=0.0).to(tl.float32)
    if ASYM:
        z = _field(qz_ptr, rn * G + g, BITS, mask)
    else:
        z = 1 << (BITS - 1)
    return ((field ^ (1 << (BITS - 1))) - z).to(tl.float32) * s


@triton.jit
def _gemv_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    qw_ptr,
    s_ptr,
    qz_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    W,
    G,
    GS,
    stride_xm,
    stride_ym,
    BITS: tl.constexpr,
    ASYM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + m * stride_xm + rk, mask=k_ok, other=0.0).to(tl.float32)
        mask = n_ok[:, None] & k_ok[None, :]
        w = _dequant_tile(
            qw_ptr, s_ptr, qz_ptr, rn[:, None], rk[None, :], mask, W, G, GS, BITS, ASYM
        )
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    qw_ptr,
    s_ptr,
    qz_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    W,
    G,
    GS,
    stride_xm,
    stride_ym,
    BITS: tl.constexpr,
    ASYM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        mask = k_ok[:, None] & n_ok[None, :]
        b = _dequant_tile(
            qw_ptr, s_ptr, qz_ptr, rn[None, :], rk[:, None], mask, W, G, GS, BITS, ASYM
        ).to(a.dtype)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_kernel(  # type: ignore[no-untyped-def]
    qw_ptr,
    s_ptr,
    qz_ptr,
    out_ptr,
    N,
    K,
    W,
    G,
    GS,
    BITS: tl.constexpr,
    ASYM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, rn[:, None], rk[None, :], mask, W, G, GS, BITS, ASYM)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers. ``qweight [N, W]`` int32, ``scales [N, G]``, ``qzeros`` (asymmetric) or None,
# ``bits``, ``cols`` (K), ``group`` (columns per scale, K when per channel).


def _common(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None
) -> tuple[int, int, int, torch.Tensor]:
    n, w = qweight.shape
    g = scales.shape[1]
    return n, w, g, (qzeros if qzeros is not None else qweight)


def gemv(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    cols: int,
    group: int,
) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` with the GEMV kernel (meant for ``M <= GEMV_MAX_M``)."""
    n, w, g, qz = _common(qweight, scales, qzeros)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(n, GEMV_BLOCK_N), m)
    _gemv_kernel[grid](
        x2,
        qweight,
        scales,
        qz,
        bias if bias is not None else y,
        y,
        n,
        cols,
        w,
        g,
        group,
        x2.stride(0),
        y.stride(0),
        BITS=bits,
        ASYM=qzeros is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=GEMV_BLOCK_N,
        BLOCK_K=GEMV_BLOCK_K,
    )
    return y


def gemm(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    cols: int,
    group: int,
) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` with the tiled GEMM kernel."""
    n, w, g, qz = _common(qweight, scales, qzeros)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, GEMM_BLOCK_M), triton.cdiv(n, GEMM_BLOCK_N))
    _gemm_kernel[grid](
        x2,
        qweight,
        scales,
        qz,
        bias if bias is not None else y,
        y,
        m,
        n,
        cols,
        w,
        g,
        group,
        x2.stride(0),
        y.stride(0),
        BITS=bits,
        ASYM=qzeros is not None,
        HAS_BIAS=bias is not None,
        IEEE=x2.dtype == torch.float32,
        BLOCK_M=GEMM_BLOCK_M,
        BLOCK_N=GEMM_BLOCK_N,
        BLOCK_K=GEMM_BLOCK_K,
    )
    return y


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    cols: int,
    group: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype``."""
    n, w, g, qz = _common(qweight, scales, qzeros)
    out = torch.empty(n, cols, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(n, DEQ_BLOCK_N), triton.cdiv(cols, DEQ_BLOCK_K))
    _dequant_kernel[grid](
        qweight,
        scales,
        qz,
        out,
        n,
        cols,
        w,
        g,
        group,
        BITS=bits,
        ASYM=qzeros is not None,
        BLOCK_N=DEQ_BLOCK_N,
        BLOCK_K=DEQ_BLOCK_K,
    )
    return out


def linear(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    cols: int,
    group: int,
) -> torch.Tensor:
    """GEMV for ``M <= GEMV_MAX_M`` rows, the GEMM kernel above."""
    fn = gemv if x2.shape[0] <= GEMV_MAX_M else gemm
    return fn(x2, qweight, scales, qzeros, bias, bits, cols, group)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU target (no GPU needed): used by the compile test.

_SIG_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def compile_for(
    kernel: str,
    capability: int,
    *,
    bits: int = 4,
    asym: bool = False,
    dtype: torch.dtype = torch.float16,
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, object]:
    """Compile one kernel for ``GPUTarget("cuda", capability, 32)``; returns Triton's ``asm``
    dict (``ptx``, and ``cubin`` when ptxas ran). Must not run under ``TRITON_INTERPRET=1``."""
    from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped, unused-ignore]
    from triton.compiler import ASTSource  # type: ignore[import-untyped, unused-ignore]

    x, s = _SIG_PTR[dtype], _SIG_PTR[scale_dtype]
    ptrs = {"x_ptr": x, "qw_ptr": "*i32", "s_ptr": s, "qz_ptr": "*i32", "b_ptr": x, "y_ptr": x}
    flags = {"BITS": bits, "ASYM": asym}
    if kernel == "gemv":
        fn = _gemv_kernel
        ints = ["N", "K", "W", "G", "GS", "stride_xm", "stride_ym"]
        consts = {**flags, "HAS_BIAS": True, "BLOCK_N": GEMV_BLOCK_N, "BLOCK_K": GEMV_BLOCK_K}
    elif kernel == "gemm":
        fn = _gemm_kernel
        ints = ["M", "N", "K", "W", "G", "GS", "stride_xm", "stride_ym"]
        consts = {
            **flags,
            "HAS_BIAS": True,
            "IEEE": dtype == torch.float32,
            "BLOCK_M": GEMM_BLOCK_M,
            "BLOCK_N": GEMM_BLOCK_N,
            "BLOCK_K": GEMM_BLOCK_K,
        }
    elif kernel == "dequantize":
        fn = _dequant_kernel
        ptrs = {"qw_ptr": "*i32", "s_ptr": s, "qz_ptr": "*i32", "out_ptr": x}
        ints = ["N", "K", "W", "G", "GS"]
        consts = {**flags, "BLOCK_N": DEQ_BLOCK_N, "BLOCK_K": DEQ_BLOCK_K}
    else:
        raise ValueError(f"unknown kernel {kernel!r}; use gemv, gemm or dequantize")
    signature: dict[str, str] = {**ptrs, **{k: "i32" for k in ints}}
    signature.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32))
    return dict(compiled.asm)


KERNELS = ("gemv", "gemm", "dequantize")
