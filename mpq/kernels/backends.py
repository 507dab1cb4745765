"""Kernel backends: which exist, which are usable here, and which can run a given layer.

A backend runs the matmul of a quantized ``Linear`` layer from its packed storage:

==============  ==================================================================================
``reference``   pure torch: dequantize the whole weight, ``F.linear``. Any device, any format.
``cpu``         torch's fused int8 / int4 CPU ops where the format allows (8-bit per channel;
                4-bit with group 32/64/128/256 or per channel, rows % 16 == 0); the reference
                path otherwise, and the layer then reports ``reference`` (:mod:`.cpu`).
``triton``      Triton GEMV (batch <= 4) / GEMM kernels reading the packed words; any width,
                group, symmetry. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``cupy``        a CuPy RawKernel dequantize-GEMV; any width, group, symmetry. CUDA tensors.
``auto``        per layer, on the device the layer is on when the backend is chosen: CUDA ->
                ``triton`` if importable, else ``cupy``, else ``reference``; CPU -> ``cpu``.
==============  ==================================================================================

Embedding lookups only dequantize the looked-up rows (no matmul) and Conv2d layers run the
reference path on every backend that accepts them; ``triton`` and ``cupy`` refuse Conv2d layers
(there is no convolution kernel) with an error naming the backends that can. A layer kept at 16
bits is a plain float16 matmul and reports ``reference``.
"""

from __future__ import annotations

import importlib.util

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.kernels.checks import KERNEL_BACKENDS, interpreted, offsets_problem

BACKENDS = ("reference", "cpu", "triton", "cupy")
REQUESTS = (*BACKENDS, "auto")


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot be used in this environment, or None when it can."""
    if backend in ("reference", "cpu"):
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install 'mpq[kernels]', i.e. triton)"
        return None
    if backend == "cupy":
        try:
            from mpq.kernels.cupy_backend import import_cupy

            import_cupy()
        except ImportError as exc:
            return str(exc)
        return None
    raise MpqError(f"backend {backend!r} is unknown; use one of {list(REQUESTS)}")


def machine_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine (not installed, or no device it runs), or None.

    ``triton`` needs a CUDA GPU or ``TRITON_INTERPRET=1``; ``cupy`` needs a CUDA GPU.
    """
    reason = unavailable_reason(backend)
    if reason is not None or backend in ("reference", "cpu"):
        return reason
    import torch

    if torch.cuda.is_available() or (backend == "triton" and interpreted()):
        return None
    extra = " (or TRITON_INTERPRET=1, the CPU interpreter)" if backend == "triton" else ""
    return f"{backend} runs CUDA tensors and this machine has no CUDA GPU{extra}"


def available_here() -> list[str]:
    """The backends that can run on this machine, in :data:`BACKENDS` order."""
    return [b for b in BACKENDS if machine_problem(b) is None]


def check_request(backend: str) -> None:
    """Raise :class:`MpqError` for an unknown backend or one that is not installed."""
    if backend not in REQUESTS:
        raise MpqError(f"backend {backend!r} is unknown; use one of {list(REQUESTS)}")
    if backend == "auto":
        return
    reason = unavailable_reason(backend)
    if reason is not None:
        raise MpqError(f"backend {backend!r} was asked for but is unavailable: {reason}")


def shape_problem(backend: str, rows: int, cols: int, fmt: QuantFormat) -> str | None:
    """Why ``backend``'s kernels cannot index a ``[rows, cols]`` weight in ``fmt``, or None."""
    if backend not in KERNEL_BACKENDS or fmt.keep:
        return None
    groups = 1 if fmt.group_size is None else cols // fmt.group_size
    return offsets_problem(rows, cols, fmt.bits, groups)


def capable(kind: str, rows: int, cols: int, fmt: QuantFormat) -> list[str]:
    """The backends that can run a layer of ``kind`` (linear, conv2d, embedding) in ``fmt``."""
    if kind == "linear":
        return [b for b in BACKENDS if shape_problem(b, rows, cols, fmt) is None]
    return ["reference", "cpu"]


def check_layer(backend: str, name: str, kind: str, rows: int, cols: int, fmt: QuantFormat) -> None:
    """Raise :class:`MpqError` when an explicitly requested backend cannot run this layer."""
    if backend in ("auto", "reference", "cpu"):
        return
    if kind == "embedding":
        return  # row lookups never need a matmul kernel
    problem = (
        f"backend {backend!r} has no {kind} kernel"
        if kind != "linear"
        else shape_problem(backend, rows, cols, fmt)
    )
    if problem is not None:
        can = capable(kind, rows, cols, fmt)
        raise MpqError(
            f"{name} ({kind} {rows}x{cols}, format {fmt.spec()}): {problem}; "
            f"backends that can run it: {', '.join(can)}"
        )


def resolve(request: str, device_type: str) -> str:
    """The concrete backend ``auto`` stands for on ``device_type`` (others are returned as is)."""
    if request != "auto":
        return request
    if device_type == "cuda":
        for b in ("triton", "cupy"):
            if unavailable_reason(b) is None:
                return b
        return "reference"
    return "cpu"
