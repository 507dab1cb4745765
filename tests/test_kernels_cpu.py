"""The fused CPU backend against the reference, and the op constraints it relies on."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from mpq.executor import apply_plan, backends, kernels, resident_bytes
from mpq.formats import QuantFormat
from mpq.kernels import cpu
from mpq.kernels.checks import matmul_bound, max_violation
from mpq.kernels.modules import PackedWeight, QuantLinear
from mpq.plan import uniform_plan
from mpq.targets import discover

FUSED = ["8", "8:asym", "8:bf16", "4:g32", "4:g64:asym", "4:g128", "4:g256:asym", "4", "4:asym"]


def _layer(spec: str, rows: int = 32, cols: int = 256, bias: bool = True) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g)
    b = torch.randn(rows, generator=g) if bias else None
    return QuantLinear(PackedWeight(w, QuantFormat.parse(spec)), b, backend="cpu")


@pytest.mark.parametrize("spec", FUSED)
@pytest.mark.parametrize("batch", [1, 5])
def test_fused_ops_match_reference_within_fp32_bound(spec: str, batch: int) -> None:
    q = _layer(spec)
    assert q.backend == "cpu"
    x = torch.randn(batch, 256, generator=torch.Generator().manual_seed(1))
    w = q.packed.dequantize()
    ref = torch.nn.functional.linear(x.double(), w.double(), q.bias.double())
    assert max_violation(q(x), ref, matmul_bound(x, w, q.bias)) <= 1.0


@pytest.mark.parametrize("spec", ["8", "4:g32:asym"])
def test_fused_ops_run_half_precision_inputs(spec: str) -> None:
    q = _layer(spec, bias=False)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    w = q.packed.dequantize()
    for dtype in (torch.float16, torch.bfloat16):
        y = q(x.to(dtype))
        assert y.dtype == dtype
        ref = x.double() @ w.double().T
        bound = matmul_bound(x, w, out_dtype=dtype, acc_dtype=dtype)
        assert max_violation(y, ref, bound) <= 1.0


@pytest.mark.parametrize(
    "spec,rows,cols",
    [("3", 32, 256), ("8:g32", 32, 256), ("4:g16", 32, 256), ("4:g32", 24, 256), ("16", 32, 64)],
)
def test_formats_the_ops_cannot_take_run_reference_and_say_so(
    spec: str, rows: int, cols: int
) -> None:
    q = _layer(spec, rows, cols)
    assert q.backend == "reference"
    x = torch.randn(2, cols)
    ref = QuantLinear(q.packed, q.bias, backend="reference")
    torch.testing.assert_close(q(x), ref(x), rtol=0, atol=0)


def test_int8_path_reads_the_packed_words_without_a_copy() -> None:
    q = _layer("8", cols=256)
    assert q.runtime_bytes() == 0
    w8 = cpu.int8_weight(q.packed.qweight, 256)
    assert w8.data_ptr() == q.packed.qweight.data_ptr()
    odd = _layer("8", cols=250)  # rows padded to whole words: the op needs a contiguous copy
    assert odd.backend == "cpu" and odd.runtime_bytes() == 32 * 250


def test_int4_path_keeps_one_repacked_copy_of_the_codes() -> None:
    q = _layer("4:g32")
    assert q.runtime_bytes() == 32 * 256 // 2
    assert "int4pack" in q.kernel


def test_op_constraints_are_as_documented() -> None:
    codes = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="16"):
        cpu.int4_weight(codes)  # N must be a multiple of 16
    w4 = cpu.int4_weight(torch.randint(0, 16, (16, 64), dtype=torch.int32))
    sz = torch.zeros(4, 16, 2)
    with pytest.raises(RuntimeError, match="qGroupSize"):
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(1, 64), w4, 16, sz)
    assert cpu.choose(QuantFormat.parse("4"), 16, 96) == cpu.CpuKernel("int4", 32)
    assert cpu.choose(QuantFormat.parse("4"), 16, 40) is None
    assert cpu.choose(QuantFormat.parse("8:g32"), 16, 64) is None


def test_tiny_llama_on_cpu_backend_matches_reference() -> None:
    model = tiny_llama()
    targets = discover(model)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    for spec in ("8:asym", "4:g32"):
        plan = uniform_plan(targets, QuantFormat.parse(spec), "tiny")
        ref = apply_plan(model, plan, targets)
        fast = apply_plan(model, plan, targets, backend="cpu")
        got = backends(fast)
        assert got["model.embed_tokens"] == "reference"  # lookups never need a matmul
        assert {v for k, v in got.items() if k != "model.embed_tokens"} == {"cpu"}
        assert all("aten" in k for k in kernels(fast).values())
        with torch.no_grad():
            for x in (ids, ids[:1, :1]):  # 24 rows: dequantize + F.linear; 1 row: the fused op
                torch.testing.assert_close(fast(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
        state, runtime = resident_bytes(fast)
        assert state == resident_bytes(ref)[0]
        # 4-bit: one repacked copy (half a byte per weight) per Linear, the tied head included.
        linear = sum(t.numel for t in targets if t.kind == "linear") + 96 * 64
        assert runtime == (0 if spec.startswith("8") else linear // 2)


def test_auto_on_cpu_picks_cpu() -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat.parse("8"), "tiny")
    assert set(backends(apply_plan(model, plan, targets, backend="auto")).values()) == {
        "cpu",
        "reference",
    }
