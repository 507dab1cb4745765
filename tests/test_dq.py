"""``:dq`` formats: double-quantized group scales (llama.cpp's k-quant layout), exact everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpq.cost import weight_bits
from mpq.errors import MpqError
from mpq.formats import QuantFormat, n_supers
from mpq.kernels.modules import PackedWeight, QuantLinear
from mpq.quant.core import DoubleQuant, nearest_codes
from mpq.quant.dq import dequantize_dq, quantize_dq
from mpq.quant.quantize import dequantize, quantize

K_SPECS = {
    "2:g16:asym:dq4": "Q2_K",
    "3:g16:dq": "Q3_K",
    "4:g32:asym:dq": "Q4_K",
    "5:g32:asym:dq": "Q5_K",
    "6:g16:dq8": "Q6_K",
}
SPECS = [*K_SPECS, "4:g32:dq", "4:g64:asym:dq8", "4:g32:nl:dq"]


def _w(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :16] = 0.0  # an all-zero group: scale code 0, never a division by zero
    w[1, 5] = 0.9  # an outlier: the super-block's extreme scale
    return w


@pytest.mark.parametrize("spec", ["4:g32:dq", "4:g32:asym:dq", "6:g16:dq8", "2:g16:asym:dq4"])
def test_spec_round_trip(spec: str) -> None:
    fmt = QuantFormat.parse(spec)
    assert fmt.spec() == spec and QuantFormat.from_dict(fmt.to_dict()) == fmt
    assert QuantFormat.parse(spec.replace(":dq", ":dq6") if spec.endswith(":dq") else spec) == fmt


@pytest.mark.parametrize(
    ("spec", "words"),
    [("4:dq", "divides the 256"), ("4:g48:dq", "got 48"), ("4:g32:dq5", "dq_bits=5")],
)
def test_bad_dq_specs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(MpqError, match=words):
        QuantFormat.parse(spec)


def test_dq_with_gptq_is_refused() -> None:
    with pytest.raises(MpqError, match="GPTQ does not choose double-quantized scales"):
        quantize(_w(2, 64), QuantFormat.parse("4:g32:dq:gptq"), hessian=torch.eye(64))


@pytest.mark.parametrize("spec", list(K_SPECS))
def test_bits_per_weight_equal_the_ggml_type_sizes(spec: str) -> None:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[K_SPECS[spec]]]
    fmt = QuantFormat.parse(spec)
    for rows, cols in ((16, 256), (32, 1536)):  # code streams that fill whole 32-bit words
        assert weight_bits((rows, cols), fmt) == rows * cols // block * size * 8
    # Otherwise mpq's packed code streams end in a partly used word (at most 31 bits each).
    extra = weight_bits((3, 256), fmt) - 3 * size * 8
    streams = 1 if fmt.symmetric else 2
    assert fmt.group_size is not None and fmt.dq_bits is not None
    used = 3 * (256 // fmt.group_size) * fmt.dq_bits
    assert extra == streams * (32 * -(-used // 32) - used)
    assert 0 <= extra < 32 * (1 if fmt.symmetric else 2)


def test_rows_that_do_not_divide_256_end_in_a_shorter_super_block() -> None:
    fmt = QuantFormat.parse("4:g32:dq")
    assert n_supers(576) == 3 and n_supers(512) == 2
    # 576 = 256 + 256 + 64: three fp16 super-scales per row, 18 six-bit codes.
    assert weight_bits((2, 576), fmt) == 2 * 576 * 4 + 2 * 3 * 16 + 32 * -(-2 * 18 * 6 // 32)
    codes, dq = quantize_dq(_w(2, 576), fmt)
    assert dq.super_scales.shape == (2, 3) and dq.scale_codes.shape == (2, 18)
    # The tail super-block's own scale: its largest group scale lands on code -32.
    signed = dq.scale_codes[:, 16:].int() - 32
    assert (signed.abs().amax(dim=1) == 32).all()


def _scalar_oracle(w: torch.Tensor, fmt: QuantFormat) -> np.ndarray:
    """The same rounding written as plain loops over one row at a time."""
    assert fmt.group_size is not None and fmt.dq_bits is not None
    g, k, b = fmt.group_size, fmt.dq_bits, fmt.bits
    out = np.zeros(tuple(w.shape), dtype=np.float32)
    for r in range(w.shape[0]):
        row = w[r].tolist()
        for s0 in range(0, len(row), 256):
            sb = row[s0 : s0 + 256]
            groups = [sb[i : i + g] for i in range(0, len(sb), g)]
            if fmt.symmetric:
                ext = [max(gr, key=abs) / -(2 ** (b - 1)) for gr in groups]
                big = max(ext, key=abs) / -(2 ** (k - 1))
                d = float(np.float32(np.float16(big)))
                for j, gr in enumerate(groups):
                    c = 0 if d == 0 else min(max(round(ext[j] / d), -(2 ** (k - 1))), 2**k // 2 - 1)
                    s = np.float32(d) * np.float32(c)
                    for i, x in enumerate(gr):
                        q = 0 if s == 0 else min(max(round(x / s), -(2 ** (b - 1))), 2**b // 2 - 1)
                        out[r, s0 + j * g + i] = np.float32(s) * np.float32(q)
            else:
                top, cm = 2**b - 1, 2**k - 1
                sc = [(max(max(gr), 0.0) - min(min(gr), 0.0)) / top for gr in groups]
                mn = [-min(min(gr), 0.0) for gr in groups]
                d = float(np.float32(np.float16(max(sc) / cm)))
                dm = float(np.float32(np.float16(max(mn) / cm)))
                for j, gr in enumerate(groups):
                    c = 0 if d == 0 else min(round(sc[j] / d), cm)
                    cmin = 0 if dm == 0 else min(round(mn[j] / dm), cm)
                    s, m = np.float32(d) * np.float32(c), np.float32(dm) * np.float32(cmin)
                    for i, x in enumerate(gr):
                        q = 0 if s == 0 else min(max(round((x + m) / s), 0), top)
                        out[r, s0 + j * g + i] = np.float32(s * np.float32(q)) - m
    return out


@pytest.mark.parametrize("spec", ["4:g32:dq", "4:g32:asym:dq", "3:g16:dq", "2:g16:asym:dq4"])
def test_quantize_matches_a_scalar_oracle(spec: str) -> None:
    fmt = QuantFormat.parse(spec)
    w = _w(3, 320)  # one full super-block and a 64-wide tail
    got = dequantize(quantize(w, fmt)).numpy()
    want = _scalar_oracle(w.double().float(), fmt)
    # Round-half cases may differ between torch.round and Python's round on ties (both to
    # even), and x/s in float32 vs float64: allow one level on a handful of weights at most.
    diff = np.abs(got - want) > 1e-7
    assert diff.mean() < 0.01, spec


def test_nl_dq_codes_are_the_nearest_iq4_nl_levels() -> None:
    import gguf

    fmt = QuantFormat.parse("4:g32:nl:dq")
    w = _w(4, 256)
    qt = quantize(w, fmt)
    levels = torch.tensor(gguf.quants.IQ4_NL.kvalues, dtype=torch.float32)
    x = w.reshape(4, 8, 32) / qt.scales[..., None]
    err = (x[..., None] - levels).abs()  # every level's distance, in units of the scale
    chosen = err.gather(-1, qt.codes.reshape(4, 8, 32, 1).long()).squeeze(-1)
    nonzero = qt.scales != 0
    assert torch.allclose(chosen[nonzero], err.amin(-1)[nonzero], atol=1e-5)


@pytest.mark.parametrize(
    "table",
    [
        [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],  # IQ4_NL
        [-4, -3, -2, -1, 0, 1, 2, 3],  # an int grid
        [-1.0, -0.6962, -0.5251, 0.0, 0.0796, 0.4407, 0.7230, 1.0],  # not integers: searched
    ],
)
def test_nearest_codes_lattice_lookup_equals_the_search(table: list[float]) -> None:
    """The half-unit lookup for integer level tables gives bucketize's answer everywhere:
    on every midpoint (ties go to the lower level), next to them, far outside, inf and NaN."""
    levels = torch.tensor(table, dtype=torch.float32)
    mid = (levels[1:] + levels[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    edges = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])
    x = torch.cat([
        torch.randn(4000, generator=g) * 80,
        torch.arange(-600, 600) / 4.0,  # every quarter unit: all midpoints of integer tables
        edges,
        torch.tensor([1e30, -1e30, float("inf"), -float("inf"), float("nan"), 0.0, -0.0]),
    ]).reshape(1, -1)  # fmt: skip
    assert torch.equal(nearest_codes(x, levels), torch.bucketize(x.contiguous(), mid))


def test_symmetric_dq_uses_the_full_signed_range() -> None:
    fmt = QuantFormat.parse("4:g32:dq")
    w = torch.zeros(1, 256)
    w[0, 3] = 0.8  # a positive extreme maps to -8 with a negative scale
    w[0, 40] = -0.4
    qt = quantize(w, fmt)
    assert qt.codes[0, 3] == 0 and float(dequantize(qt)[0, 3]) == pytest.approx(0.8, rel=1e-3)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("cols", [256, 576])
def test_packed_buffers_hold_exactly_the_costed_bits(spec: str, cols: int) -> None:
    fmt = QuantFormat.parse(spec)
    w = _w(16, cols)
    pw = PackedWeight(w, fmt)
    pw.check()
    bits = sum(b.numel() * b.element_size() * 8 for b in pw.state_dict().values())
    assert bits == weight_bits((16, cols), fmt)
    ref = dequantize(quantize(w, fmt))
    assert torch.equal(pw.dequantize(), ref)
    empty = PackedWeight.empty((16, cols), fmt)
    empty.load_state_dict(pw.state_dict())
    empty.check()
    rows = torch.tensor([5, 0, 9])
    assert torch.equal(empty.dequantize_rows(rows), ref[rows])


@pytest.mark.parametrize("spec", ["4:g32:dq", "4:g32:asym:dq", "6:g16:dq8", "4:g32:nl:dq"])
def test_cpu_backend_matches_the_reference(spec: str) -> None:
    fmt = QuantFormat.parse(spec)
    w = _w(32, 576)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(3))
    ref = QuantLinear(PackedWeight(w, fmt), None, backend="reference")
    cpu = QuantLinear(PackedWeight(w, fmt), None, backend="cpu")
    if fmt.bits == 4 and fmt.grid == "int":
        assert cpu.backend == "cpu" and "int4" in cpu.kernel  # the fused op reads :dq scales
    else:
        assert cpu.backend == "reference"  # no fused op for 6 bits or a level table: said so
    exact = x @ dequantize(quantize(w, fmt)).T
    assert torch.equal(ref(x), torch.nn.functional.linear(x, dequantize(quantize(w, fmt))))
    # The int4 op accumulates in its own order: float32 rounding of a 576-term dot product.
    assert torch.allclose(cpu(x), exact, rtol=1e-4, atol=1e-5)


def test_gpu_kernels_refuse_dq_with_the_backends_that_can() -> None:
    fmt = QuantFormat.parse("4:g32:dq")
    with pytest.raises(MpqError, match=r"double-quantized.*reference, cpu"):
        QuantLinear(PackedWeight(_w(16, 256), fmt), None, backend="triton")


def test_corrupted_scale_codes_are_detected() -> None:
    pw = PackedWeight(_w(2, 64), QuantFormat.parse("4:g32:asym:dq"))
    pw.qscales[0, -1] |= 1 << 30  # a padding bit of the 4 six-bit scale codes
    with pytest.raises(MpqError, match="qscales: padding bits"):
        pw.check()


def test_dequantize_dq_is_llamas_float_order() -> None:
    """``s * u - m`` with ``s = d * c`` in float32: the order gguf/llama.cpp use."""
    fmt = QuantFormat.parse("4:g32:asym:dq")
    codes = torch.tensor([[15] * 32], dtype=torch.uint8)
    dq = DoubleQuant(
        torch.tensor([[0.0123]], dtype=torch.float16),
        torch.tensor([[63]], dtype=torch.uint8),
        torch.tensor([[0.0456]], dtype=torch.float16),
        torch.tensor([[17]], dtype=torch.uint8),
    )
    d, dm = np.float32(np.float16(0.0123)), np.float32(np.float16(0.0456))
    want = np.float32(d * np.float32(63)) * np.float32(15) - np.float32(dm * np.float32(17))
    assert dequantize_dq(codes, dq, fmt)[0, 0].item() == want
