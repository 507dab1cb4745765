"""Triton kernels that read the packed layout of :mod:`mpq.kernels.packing` directly.

For any width 2..8, any group size (or per channel), symmetric or asymmetric, float16/bfloat16/
float32 scales and inputs. Every kernel gets its weights from one ``@triton.jit`` helper,
``_dequant_tile``: it extracts each code of a tile from its word (and the next word when the
code straddles two, only for widths that do not divide 32) and dequantizes
``(code - z) * scale`` in float32. Two kernels call it:

- ``_linear_kernel``, launched by :func:`gemv` (``GEMV=True``: batch 1 (decode) and tiny
  batches, ``M <= GEMV_MAX_M``; one program per ``BLOCK_N`` output rows and input row walks
  ``K`` in ``BLOCK_K`` steps and accumulates ``w * x`` in float32) and :func:`gemm` (larger
  batches; ``BLOCK_M x BLOCK_N`` tiles, the weight tile cast to the input dtype and multiplied
  with ``tl.dot``, float32 inputs with ``input_precision="ieee"``, float32 accumulator);
- ``_dequant_kernel``, launched by :func:`dequantize`: the whole weight to a dense matrix (for
  checks and for a dequantize + cuBLAS path); bit-exact with
  :meth:`mpq.kernels.modules.PackedWeight.dequantize`.

Launchers take the input and a :class:`~mpq.kernels.checks.KernelOperands` and check it first
(layout, device, int32 offsets: :mod:`mpq.kernels.checks`, shared with the CuPy backend).
Block sizes are fixed, not autotuned (autotune does not run under ``TRITON_INTERPRET=1`` and no
GPU was available to tune on). Only the Triton API shared by Triton 3.6 and 3.7 is used.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-untyped, unused-ignore]

from mpq.kernels.checks import KernelOperands

GEMV_MAX_M = 4
GEMV_BLOCK_N = 16
GEMV_BLOCK_K = 256
GEMM_BLOCK_M = 32
GEMM_BLOCK_N = 64
GEMM_BLOCK_K = 32
DEQ_BLOCK_N = 16
DEQ_BLOCK_K = 128


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
def _linear_kernel(  # type: ignore[no-untyped-def]
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
    GEMV: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y = x @ W^T (+ b)``. ``GEMV``: grid ``(N / BLOCK_N, M)``, a float32 multiply-and-reduce
    per input row (``BLOCK_M`` unused); else grid ``(M / BLOCK_M, N / BLOCK_N)``, ``tl.dot``."""
    if GEMV:
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
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
    else:
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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
# Launchers: every one checks its operands first (mpq.kernels.checks), raising MpqError.


def _linear(x2: torch.Tensor, ops: KernelOperands, gemv: bool) -> torch.Tensor:
    ops.check("triton", x2)
    x2 = x2.contiguous()
    m, n = x2.shape[0], ops.rows
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if gemv:
        grid = (triton.cdiv(n, GEMV_BLOCK_N), m)
        blocks = {"BLOCK_M": 1, "BLOCK_N": GEMV_BLOCK_N, "BLOCK_K": GEMV_BLOCK_K}
    else:
        grid = (triton.cdiv(m, GEMM_BLOCK_M), triton.cdiv(n, GEMM_BLOCK_N))
        blocks = {"BLOCK_M": GEMM_BLOCK_M, "BLOCK_N": GEMM_BLOCK_N, "BLOCK_K": GEMM_BLOCK_K}
    _linear_kernel[grid](
        x2,
        ops.qweight,
        ops.scales,
        ops.zeros_arg,
        ops.bias if ops.bias is not None else y,
        y,
        m,
        n,
        ops.cols,
        ops.words,
        ops.groups,
        ops.group,
        x2.stride(0),
        y.stride(0),
        BITS=ops.bits,
        ASYM=ops.asym,
        HAS_BIAS=ops.bias is not None,
        GEMV=gemv,
        IEEE=x2.dtype == torch.float32,
        **blocks,
    )
    return y


def gemv(x2: torch.Tensor, ops: KernelOperands) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` with the GEMV path (meant for ``M <= GEMV_MAX_M``)."""
    return _linear(x2, ops, gemv=True)


def gemm(x2: torch.Tensor, ops: KernelOperands) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` with the tiled GEMM path."""
    return _linear(x2, ops, gemv=False)


def linear(x2: torch.Tensor, ops: KernelOperands) -> torch.Tensor:
    """GEMV for ``M <= GEMV_MAX_M`` rows, the GEMM path above."""
    return _linear(x2, ops, gemv=x2.shape[0] <= GEMV_MAX_M)


def dequantize(ops: KernelOperands, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (``ops.bias`` is not added)."""
    ops.check("triton")
    n, k = ops.rows, ops.cols
    out = torch.empty(n, k, dtype=dtype, device=ops.qweight.device)
    grid = (triton.cdiv(n, DEQ_BLOCK_N), triton.cdiv(k, DEQ_BLOCK_K))
    _dequant_kernel[grid](
        ops.qweight,
        ops.scales,
        ops.zeros_arg,
        out,
        n,
        k,
        ops.words,
        ops.groups,
        ops.group,
        BITS=ops.bits,
        ASYM=ops.asym,
        BLOCK_N=DEQ_BLOCK_N,
        BLOCK_K=DEQ_BLOCK_K,
    )
    return out


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
    if kernel in ("gemv", "gemm"):
        fn = _linear_kernel
        ints = ["M", "N", "K", "W", "G", "GS", "stride_xm", "stride_ym"]
        gemv = kernel == "gemv"
        consts = {
            **flags,
            "HAS_BIAS": True,
            "GEMV": gemv,
            "IEEE": dtype == torch.float32,
            "BLOCK_M": 1 if gemv else GEMM_BLOCK_M,
            "BLOCK_N": GEMV_BLOCK_N if gemv else GEMM_BLOCK_N,
            "BLOCK_K": GEMV_BLOCK_K if gemv else GEMM_BLOCK_K,
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
