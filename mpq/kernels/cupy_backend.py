"""The CuPy backend: the dequantize-GEMV of the packed layout as one CUDA ``RawKernel``.

One thread block of 128 threads per (output row, input row): the threads stride over ``K``,
extract each code from its 32-bit word (and the next one when it straddles), dequantize
``(code - z) * scale`` in float32, multiply by ``x`` and reduce (warp shuffles, then shared
memory). Any width 2..8, any group size, symmetric or asymmetric. Inputs and scales are passed
as float32 (converted on the torch side), the output is cast back to the input's dtype. It is a
straightforward kernel for checking and for decode, not a tuned GEMM: large batches run one
block per output value.

CuPy is an optional extra (``pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12``). The source
compiles with NVRTC without a GPU (:func:`compile_cubin`, used by the tests).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpq.kernels.backends import KernelChoice, LaunchingBackend, launch
from mpq.kernels.checks import KernelOperands

if TYPE_CHECKING:
    from mpq.kernels.modules import PackedWeight, QuantLinear

KERNEL_NAME = "mpq_dequant_gemv"
THREADS = 128
MAX_GRID_Y = 65535

SOURCE = r"""
__device__ __forceinline__ unsigned int mpq_field(
    const unsigned int* __restrict__ p, long long idx, int bits)
{
    long long off = idx * bits;
    long long word = off >> 5;
    int sh = (int)(off & 31);
    unsigned int v = p[word] >> sh;
    if (sh + bits > 32) v |= p[word + 1] << (32 - sh);
    return v & ((1u << bits) - 1u);
}

extern "C" __global__ void mpq_dequant_gemv(
    const float* __restrict__ x,            // [M, K]
    const unsigned int* __restrict__ qw,    // [N, W] packed fields (code XOR 2^(bits-1))
    const float* __restrict__ scales,       // [N, G]
    const unsigned int* __restrict__ qz,    // one stream of N*G zero-points (asym) or unused
    const float* __restrict__ bias,         // [N] or unused
    float* __restrict__ y,                  // [M, N]
    int M, int N, int K, int W, int G, int GS, int bits, int asym, int has_bias)
{
    const int n = blockIdx.x;
    const int m = blockIdx.y;
    if (n >= N || m >= M) return;
    const unsigned int* row = qw + (long long)n * W;
    const float* xr = x + (long long)m * K;
    const int half = 1 << (bits - 1);
    float acc = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const int g = k / GS;
        const int code = (int)(mpq_field(row, k, bits) ^ (unsigned int)half);
        const int z = asym ? (int)mpq_field(qz, (long long)n * G + g, bits) : half;
        acc += (float)(code - z) * scales[(long long)n * G + g] * xr[k];
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    __shared__ float part[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        acc = lane < nw ? part[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
        if (lane == 0) y[(long long)m * N + n] = acc + (has_bias ? bias[n] : 0.0f);
    }
}
"""


def import_cupy() -> Any:
    """The ``cupy`` module; raises ImportError with the install hint when it is missing."""
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or a broken CUDA install
        raise ImportError(
            f"CuPy is not usable ({exc}); install the optional extra: "
            "pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12"
        ) from exc
    return cupy


def compile_cubin(arch: str = "sm_80") -> bytes:
    """Compile :data:`SOURCE` with NVRTC for ``arch`` (e.g. ``sm_80``, ``sm_90``): no GPU needed."""
    nvrtc = importlib.import_module("cupy_backends.cuda.libs.nvrtc")

    prog = nvrtc.createProgram(SOURCE, "mpq_dequant_gemv.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-std=c++14"])
        except Exception as exc:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed for {arch}: {exc}\n{log}") from exc
        return bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)


_KERNEL: Any = None


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        cupy = import_cupy()
        _KERNEL = cupy.RawKernel(SOURCE, KERNEL_NAME, options=("-std=c++14",))
    return _KERNEL


def linear(x2: torch.Tensor, ops: KernelOperands) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` on CUDA tensors (checked first, :mod:`mpq.kernels.checks`)."""
    import numpy as np

    ops.check("cupy", x2)
    cupy = import_cupy()
    m, n = x2.shape[0], ops.rows
    xf = x2.float().contiguous()
    sf = ops.scales.float().contiguous()
    bf = ops.bias.float().contiguous() if ops.bias is not None else sf
    y = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(x2.device).cuda_stream)
    flags = (ops.bits, int(ops.asym), int(ops.bias is not None))
    with cupy.cuda.Device(x2.device.index or 0), stream:
        for m0 in range(0, m, MAX_GRID_Y):  # gridDim.y is at most 65535
            xs, ys = xf[m0 : m0 + MAX_GRID_Y], y[m0 : m0 + MAX_GRID_Y]
            args = [cupy.from_dlpack(t) for t in (xs, ops.qweight, sf, ops.zeros_arg, bf, ys)]
            ints = (xs.shape[0], n, ops.cols, ops.words, ops.groups, ops.group, *flags)
            _kernel()((n, xs.shape[0]), (THREADS,), (*args, *(np.int32(v) for v in ints)))
    return y.to(x2.dtype)


@dataclass(frozen=True)
class CupyBackend(LaunchingBackend):
    """The ``cupy`` backend: a CuPy RawKernel dequantize-GEMV; any width, group, symmetry; CUDA
    tensors (64-bit activation offsets)."""

    def unavailable_reason(self) -> str | None:
        try:
            import_cupy()
        except ImportError as exc:
            return str(exc)
        return None

    def prepare(self, packed: PackedWeight) -> KernelChoice:
        return KernelChoice("cupy", "cupy RawKernel dequant-gemv")

    def linear(self, layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
        return launch(linear, layer, x2)


BACKEND = CupyBackend("cupy")
