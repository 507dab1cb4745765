"""Triton kernels against the reference: on CPU under TRITON_INTERPRET=1 (set by conftest), on a
GPU when one is present, and compiled for sm_80 / sm_90 so a kernel that would not build on a
GPU fails here.

Bounds: dequantization is bit-exact (the kernels compute the reference's float32 weights);
GEMV/GEMM outputs are within ``matmul_bound`` of the float64 product of the dequantized weight:
``2 (K u + u) sum_k |x_k w_k|`` with ``u = 2^-24`` for float32 (``mpq.kernels.checks``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_llama

from mpq.executor import apply_plan, backends
from mpq.formats import QuantFormat
from mpq.kernels import checks
from mpq.kernels.checks import matmul_bound, max_violation
from mpq.kernels.modules import PackedWeight, QuantLinear
from mpq.plan import uniform_plan
from mpq.targets import discover

tk = pytest.importorskip("mpq.kernels.triton_kernels", reason="triton is not installed")

INTERPRETED = checks.interpreted()
SPECS = [f"{b}{g}" for b in range(2, 9) for g in ("", ":g32:asym")] + [
    "3:g64:bf16",
    "5:g128:asym:fp32",
    "6:g32",
]


def _packed(spec: str, rows: int, cols: int, seed: int = 0) -> PackedWeight:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return PackedWeight(w, QuantFormat.parse(spec))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


needs_runner = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1",
)


@needs_runner
@pytest.mark.parametrize("spec", SPECS)
def test_dequantize_kernel_is_bit_exact(spec: str) -> None:
    p = _packed(spec, 24, 128).to(_device())
    got = tk.dequantize(p.operands())
    assert torch.equal(got.cpu(), p.dequantize().cpu())


@needs_runner
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("batch", [1, 3, 6])
def test_gemv_and_gemm_within_fp32_bound(spec: str, batch: int) -> None:
    rows, cols = 40, 384  # several row blocks, a partial K block, groups across blocks
    p = _packed(spec, rows, cols, seed=batch).to(_device())
    g = torch.Generator().manual_seed(10 + batch)
    x = torch.randn(batch, cols, generator=g).to(_device())
    b = torch.randn(rows, generator=g).to(_device())
    w = p.dequantize()
    fn = tk.gemv if batch <= tk.GEMV_MAX_M else tk.gemm
    y = fn(x, p.operands(b))
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert max_violation(y.cpu(), ref.cpu(), matmul_bound(x.cpu(), w.cpu(), b.cpu())) <= 1.0


@needs_runner
def test_gemv_also_handles_batches_and_gemm_batch_one() -> None:
    p = _packed("3:asym", 16, 96).to(_device())
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(3)).to(_device())
    w = p.dequantize()
    ref = x.double() @ w.double().T
    for fn in (tk.gemv, tk.gemm):
        for rows in (x[:1], x):
            y = fn(rows, p.operands())
            bound = matmul_bound(rows.cpu(), w.cpu())
            assert max_violation(y.cpu(), ref[: rows.shape[0]].cpu(), bound) <= 1.0


@needs_runner
def test_tiny_llama_on_triton_backend_matches_reference() -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat.parse("3:g32:asym"), "tiny")
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = apply_plan(model, plan, targets)
    fast = apply_plan(model, plan, targets, backend="triton")
    names = backends(fast)
    assert names.pop("model.embed_tokens") == "reference"
    assert set(names.values()) == {"triton"}
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mpq.errors import MpqError

    monkeypatch.setattr(checks, "interpreted", lambda: False)
    q = QuantLinear(_packed("4", 8, 32), None, backend="triton")
    with pytest.raises(MpqError, match="CUDA tensors.*TRITON_INTERPRET"):
        q(torch.randn(1, 32))


def test_offsets_problem_names_int32_overflow() -> None:
    assert checks.offsets_problem(4096, 11008, 4, 86) is None
    assert checks.offsets_problem(4096, 11008, 4, 86, batch=4096) is None
    assert "int32" in str(checks.offsets_problem(2**20, 2**16, 8, 1))
    assert "a batch of 2 rows" in str(checks.offsets_problem(8, 2**30, 2, 1, batch=2))


def _edit(ops: checks.KernelOperands, **changes: object) -> checks.KernelOperands:
    return dataclasses.replace(ops, **changes)  # type: ignore[arg-type]


@needs_runner
def test_both_backends_check_their_operands_before_launching() -> None:
    """The launchers of both backends share one check (mpq.kernels.checks): each bad operand is
    refused with the problem and the fix, before any kernel (or the cupy import) runs."""
    from mpq.errors import MpqError
    from mpq.kernels import cupy_backend

    p = _packed("3:g32:asym", 8, 64)
    ops = p.operands(torch.zeros(8))
    x = torch.randn(2, 64)
    qz = ops.qzeros
    assert qz is not None
    bad = {
        "bits=9: the kernels run widths 2..8": (_edit(ops, bits=9), x),
        "group 48 does not divide the row length 64": (_edit(ops, group=48), x),
        r"qweight is torch.int64 \[8, 6\], expected torch.int32 \[8, 6\]": (
            _edit(ops, qweight=ops.qweight.long()),
            x,
        ),
        r"scales is .* \[8, 1\], expected float \[8, 2\]": (
            _edit(ops, scales=ops.scales[:, :1]),
            x,
        ),
        r"qzeros is .*expected torch.int32 \[1, 2\]": (_edit(ops, qzeros=qz[:, :1]), x),
        r"bias is .* \[7\], expected float \[8\]": (_edit(ops, bias=torch.zeros(7)), x),
        "scales are torch.int32; use float32": (_edit(ops, scales=ops.scales.int()), x),
        "not contiguous: scales; call .contiguous": (_edit(ops, scales=torch.ones(2, 8).T), x),
        r"the input has shape \[2, 63\], expected \[M, 64\]": (ops, x[:, :63]),
        "the input is torch.int64; use float32": (ops, x.long()),
    }
    for match, (o, xi) in bad.items():
        with pytest.raises(MpqError, match="the triton kernels cannot run it: " + match):
            tk.linear(xi, o)
    with pytest.raises(MpqError, match="the triton kernels cannot run it: bits=9"):
        tk.dequantize(_edit(ops, bits=9))
    # cupy: the same layout check, and CPU tensors are refused with the fix.
    with pytest.raises(MpqError, match="backend 'cupy' runs CUDA tensors, the input is on cpu"):
        cupy_backend.linear(x, ops)
    # The good operands run (and match the reference).
    ref = torch.nn.functional.linear(x.double(), p.dequantize().double())
    bound = matmul_bound(x, p.dequantize(), torch.zeros(8))
    assert max_violation(tk.linear(x, ops), ref, bound) <= 1.0


COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from mpq.kernels import triton_kernels as tk
    out = {}
    cases = [("gemv", 3, True, torch.float16), ("gemv", 4, False, torch.bfloat16),
             ("gemm", 5, True, torch.float16), ("gemm", 8, False, torch.float32),
             ("dequantize", 6, True, torch.float16)]
    for cap in (80, 90):
        for kernel, bits, asym, dtype in cases:
            key = f"{kernel}-b{bits}-{'asym' if asym else 'sym'}-{dtype}-sm{cap}"
            try:
                asm = tk.compile_for(kernel, cap, bits=bits, asym=asym, dtype=dtype)
                out[key] = {"ptx": len(asm.get("ptx", "")), "cubin": len(asm.get("cubin", b""))}
            except Exception as exc:
                out[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(out))
    """
)


def test_kernels_compile_for_sm80_and_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    if errors and all("ptxas" in e.lower() for e in errors.values()):
        pytest.skip(
            f"no working ptxas, Triton cannot finish compiling: {next(iter(errors.values()))}"
        )
    assert not errors, errors
    for key, r in results.items():
        assert r["ptx"] > 0, key
        assert r["cubin"] > 0, key
    assert len(results) == 10


@pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED,
    reason="no CUDA GPU on this machine"
    if not torch.cuda.is_available()
    else "TRITON_INTERPRET=1 runs kernels on the CPU",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_against_reference(dtype: torch.dtype) -> None:
    p = _packed("4:g128", 256, 1024).cuda()
    x = torch.randn(2, 1024, device="cuda").to(dtype)
    w = p.dequantize(dtype)
    y = tk.gemv(x, p.operands())
    ref = x.double() @ w.double().T
    bound = matmul_bound(x.float().cpu(), w.float().cpu(), out_dtype=dtype)
    assert max_violation(y.cpu(), ref.cpu(), bound) <= 1.0
    xg = torch.randn(64, 1024, device="cuda").to(dtype)
    yg = tk.gemm(xg, p.operands())
    refg = xg.double() @ w.double().T
    boundg = matmul_bound(xg.float().cpu(), w.float().cpu(), out_dtype=dtype, acc_dtype=dtype)
    assert max_violation(yg.cpu(), refg.cpu(), boundg) <= 1.0
