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

Each backend is one object in its own file (``reference.py``, ``cpu.py``, ``triton_backend.py``,
``cupy_backend.py``), registered by name in :data:`mpq.registry.BACKENDS` and shaped like
optimum-quanto's: :meth:`Backend.unavailable_reason` / ``available()`` (installed here?),
:meth:`Backend.machine_problem` and :meth:`Backend.device_problem` (a device it runs on?),
:meth:`Backend.supports` (this layer's kind, shape and format?), :meth:`Backend.prepare` (what it
precomputes for one packed weight: runtime buffers and the kernel it reports) and
:meth:`Backend.linear` (the matmul). The reference backend is the oracle every backend is
tested against. The functions below answer the questions over all backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.kernels.packing import offsets_problem
from mpq.registry import BACKENDS as REGISTRY

if TYPE_CHECKING:
    import torch

    from mpq.kernels.checks import KernelOperands
    from mpq.kernels.modules import PackedWeight, QuantLinear

BACKENDS = REGISTRY.names()
REQUESTS = (*BACKENDS, "auto")
# What ``auto`` picks on each device type: the first backend installed here.
AUTO = {"cuda": ("triton", "cupy", "reference"), "cpu": ("cpu",)}


@dataclass
class KernelChoice:
    """What a backend prepared for one packed weight: the backend the layer reports (a backend
    may hand a format it has no kernel for to ``reference``), the kernel it runs, runtime-only
    buffers the layer registers (non-persistent: not in the state dict) and private state."""

    backend: str
    kernel: str
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None


REFERENCE_KERNEL = KernelChoice("reference", "dequantize + F.linear")


@dataclass(frozen=True)
class Backend:
    """A kernel backend (subclass it, one per file; the defaults are the reference's answers).

    ``launches_kernels``: it launches its own kernels on :class:`KernelOperands` (int32 offsets
    and layout are checked); ``int32_activations``: its kernels index activations with int32."""

    name: str
    launches_kernels: bool = False
    int32_activations: bool = False

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot be used in this environment (not installed), or None."""
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def device_problem(self, device: torch.device) -> str | None:
        """Why its kernels cannot run tensors on ``device`` (with the fix), or None."""
        return None

    def machine_problem(self) -> str | None:
        """Why it cannot run on this machine (not installed, or no device it runs), or None."""
        return self.unavailable_reason()

    def supports(self, fmt: QuantFormat, rows: int, cols: int, kind: str = "linear") -> str | None:
        """Why it cannot run a ``kind`` layer of a ``[rows, cols]`` weight in ``fmt``, or None."""
        return None

    def prepare(self, packed: PackedWeight) -> KernelChoice:
        """What the layer keeps to run ``packed`` on this backend."""
        return REFERENCE_KERNEL

    def linear(self, layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [M, K] @ W^T + bias`` for the packed Linear ``layer``."""
        import torch.nn.functional as F

        p = layer.packed
        w = p.weight if p.fmt.keep else p.dequantize(x2.dtype)
        bias = None if layer.bias is None else layer.bias.to(x2.dtype)
        return F.linear(x2, w.reshape(p.rows, p.cols).to(x2.dtype), bias)


@dataclass(frozen=True)
class LaunchingBackend(Backend):
    """A backend that launches its own kernels on :class:`KernelOperands` (Triton, CuPy): Linear
    layers only, CUDA tensors, offsets within int32."""

    launches_kernels: bool = True

    def machine_problem(self) -> str | None:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        import torch

        if torch.cuda.is_available() or self.device_problem(torch.device("cpu")) is None:
            return None
        return f"{self.name} runs CUDA tensors and this machine has no CUDA GPU{self.cpu_note}"

    @property
    def cpu_note(self) -> str:
        """How it could run without a GPU, for messages ('' when it cannot)."""
        return ""

    def supports(self, fmt: QuantFormat, rows: int, cols: int, kind: str = "linear") -> str | None:
        if kind != "linear":
            return f"backend {self.name!r} has no {kind} kernel"
        if fmt.keep:
            return None
        if fmt.dq_bits is not None:
            return "its kernels do not read double-quantized (:dq) scales"
        if fmt.grid != "int":
            return f"its kernels read uniform integer grids, not the {fmt.grid!r} level table"
        groups = 1 if fmt.group_size is None else cols // fmt.group_size
        return offsets_problem(rows, cols, fmt.bits, groups)

    def device_problem(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            return None
        return (
            f"backend {self.name!r} runs CUDA tensors, the input is on {device}; move the model "
            f"to a GPU or use backend 'cpu'"
        )


def launch(
    kernel: Callable[[torch.Tensor, KernelOperands], torch.Tensor],
    layer: QuantLinear,
    x2: torch.Tensor,
) -> torch.Tensor:
    """Run a Triton/CuPy ``kernel`` on ``layer``'s operands; errors name the layer."""
    bias = layer.bias.to(x2.dtype) if layer.bias is not None else None
    try:
        return kernel(x2, layer.packed.operands(bias))
    except MpqError as exc:
        raise MpqError(f"{layer.layer_name}: {exc}") from None


def get(backend: str) -> Backend:
    """The backend object called ``backend``."""
    if backend not in BACKENDS:
        raise MpqError(f"backend {backend!r} is unknown; use one of {list(REQUESTS)}")
    obj: Backend = REGISTRY.load(backend)
    return obj


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot be used in this environment, or None when it can."""
    return get(backend).unavailable_reason()


def machine_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine (not installed, or no device it runs), or None.

    ``triton`` needs a CUDA GPU or ``TRITON_INTERPRET=1``; ``cupy`` needs a CUDA GPU.
    """
    return get(backend).machine_problem()


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
    return get(backend).supports(fmt, rows, cols, "linear")


def capable(kind: str, rows: int, cols: int, fmt: QuantFormat) -> list[str]:
    """The backends that can run a layer of ``kind`` (linear, conv2d, embedding) in ``fmt``."""
    return [b for b in BACKENDS if get(b).supports(fmt, rows, cols, kind) is None]


def check_layer(backend: str, name: str, kind: str, rows: int, cols: int, fmt: QuantFormat) -> None:
    """Raise :class:`MpqError` when an explicitly requested backend cannot run this layer."""
    if backend == "auto" or kind == "embedding":
        return  # auto picks per layer; row lookups never need a matmul kernel
    problem = get(backend).supports(fmt, rows, cols, kind)
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
    prefs = AUTO.get(device_type, AUTO["cpu"])
    return next((b for b in prefs if get(b).available()), "reference")
