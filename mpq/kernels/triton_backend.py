"""The ``triton`` backend: Triton GEMV (batch <= 4) / GEMM kernels reading the packed words
(:mod:`mpq.kernels.triton_kernels`, imported only to run); any width, group, symmetry. CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpq.kernels import checks
from mpq.kernels.backends import KernelChoice, LaunchingBackend, launch

if TYPE_CHECKING:
    import torch

    from mpq.kernels.modules import PackedWeight, QuantLinear


@dataclass(frozen=True)
class TritonBackend(LaunchingBackend):
    int32_activations: bool = True  # Triton indexes activations with int32

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install 'mpq[kernels]', i.e. triton)"
        return None

    @property
    def cpu_note(self) -> str:
        return " (or TRITON_INTERPRET=1, the CPU interpreter)"

    def device_problem(self, device: torch.device) -> str | None:
        if device.type == "cuda" or checks.interpreted():
            return None
        return (
            f"backend 'triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), the "
            f"input is on {device}; move the model to a GPU or use backend 'cpu'"
        )

    def prepare(self, packed: PackedWeight) -> KernelChoice:
        return KernelChoice("triton", "triton gemv (M<=4) / gemm")

    def linear(self, layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
        from mpq.kernels.triton_kernels import linear

        return launch(linear, layer, x2)


BACKEND = TritonBackend("triton")
