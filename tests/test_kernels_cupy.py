"""The CuPy backend: its CUDA source compiles with NVRTC (no GPU needed) and, on a GPU, matches
the reference within the float32 matmul bound of ``mpq.kernels.checks``."""

from __future__ import annotations

import pytest
import torch

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.kernels import cupy_backend
from mpq.kernels.backends import unavailable_reason
from mpq.kernels.checks import matmul_bound, max_violation
from mpq.kernels.modules import PackedWeight, QuantLinear

CUPY_MISSING = unavailable_reason("cupy")


def _nvrtc_reason() -> str | None:
    if CUPY_MISSING is not None:
        return CUPY_MISSING
    try:
        cupy_backend.compile_cubin("sm_80")
    except Exception as exc:  # NVRTC library missing or unloadable
        return f"NVRTC is not usable here: {type(exc).__name__}: {exc}"
    return None


NVRTC_REASON = _nvrtc_reason()


@pytest.mark.skipif(NVRTC_REASON is not None, reason=str(NVRTC_REASON))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_source_compiles_with_nvrtc(arch: str) -> None:
    cubin = cupy_backend.compile_cubin(arch)
    assert cubin[:4] == b"\x7fELF"  # a CUDA ELF image
    assert len(cubin) > 1000


def test_cupy_backend_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import mpq.kernels.backends as B

    def missing(name: str) -> str | None:
        return "CuPy is not usable (No module named 'cupy')" if name == "cupy" else None

    monkeypatch.setattr(B, "unavailable_reason", missing)
    p = PackedWeight(torch.randn(8, 32), QuantFormat(bits=4))
    with pytest.raises(MpqError, match="backend 'cupy' was asked for but is unavailable: CuPy"):
        QuantLinear(p, None, backend="cupy")


@pytest.mark.skipif(CUPY_MISSING is not None, reason=str(CUPY_MISSING))
def test_cupy_backend_refuses_cpu_tensors() -> None:
    q = QuantLinear(PackedWeight(torch.randn(8, 32), QuantFormat(bits=4)), None, backend="cupy")
    with pytest.raises(MpqError, match="backend 'cupy' runs CUDA tensors"):
        q(torch.randn(1, 32))


@pytest.mark.skipif(
    CUPY_MISSING is not None or not torch.cuda.is_available(),
    reason=str(CUPY_MISSING) if CUPY_MISSING else "no CUDA GPU on this machine",
)
@pytest.mark.parametrize("spec", ["2", "3:g32:asym", "4:g128", "5:asym:bf16", "8:g64"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_matches_reference(spec: str, batch: int) -> None:
    g = torch.Generator().manual_seed(batch)
    w = torch.randn(48, 256, generator=g)
    p = PackedWeight(w, QuantFormat.parse(spec)).cuda()
    b = torch.randn(48, generator=g)
    q = QuantLinear(p, b, backend="cupy").cuda()
    x = torch.randn(batch, 256, generator=g)
    y = q(x.cuda()).cpu()
    wd = p.dequantize().cpu()
    ref = torch.nn.functional.linear(x.double(), wd.double(), b.double())
    assert max_violation(y, ref, matmul_bound(x, wd, b)) <= 1.0
