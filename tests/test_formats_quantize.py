"""Formats parse and print exactly; RTN obeys its error bound and the stored grid."""

from __future__ import annotations

import pytest
import torch

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.quant.quantize import dequantize, fake_quantize, quantize


@pytest.mark.parametrize(
    "spec",
    ["4", "4:g128", "4:g128:asym", "3:asym:bf16", "8:fp32", "2:g32:asym:a8", "16", "16:a8"],
)
def test_spec_round_trip(spec: str) -> None:
    fmt = QuantFormat.parse(spec)
    assert fmt.spec() == spec
    assert QuantFormat.parse(fmt.spec()) == fmt
    assert QuantFormat.from_dict(fmt.to_dict()) == fmt


def test_parse_fields() -> None:
    f = QuantFormat.parse("4:g128:asym:bf16")
    assert (f.bits, f.group_size, f.symmetric, f.scale_dtype) == (4, 128, False, "bfloat16")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1", "bits=1 is not supported"),
        ("9", "bits=9 is not supported"),
        ("32", "bits=32 is not supported"),
        ("x", "must start with the bit-width"),
        ("4:g0", "group_size=0"),
        ("4:zz", "unknown token 'zz'"),
        ("4:a1", "act_bits=1"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, expected: str) -> None:
    with pytest.raises(MpqError, match=expected):
        QuantFormat.parse(spec)


@pytest.mark.parametrize("spec", ["2", "3", "4:asym", "5:g16", "6:g16:asym", "7", "8:asym:fp32"])
def test_rtn_codes_in_range_and_error_within_half_step(spec: str) -> None:
    fmt = QuantFormat.parse(spec)
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    qt = quantize(w, fmt)
    assert int(qt.codes.max()) < (1 << fmt.bits)
    assert qt.scales.dtype == {"float16": torch.float16, "float32": torch.float32}[fmt.scale_dtype]
    err = (dequantize(qt) - w).abs()
    group = fmt.group_size or 32
    step = qt.scales.float().abs().repeat_interleave(group, dim=1)
    # Inside the grid the error is at most half a step. Symmetric: the signed absmax sits on the
    # most negative level -2^(b-1), so weights of the other sign beyond (2^(b-1)-1)|s| are
    # clipped, by at most one step.
    top = ((1 << (fmt.bits - 1)) - 1 if fmt.symmetric else (1 << fmt.bits)) * step
    inside = w.abs() <= top + step / 2
    assert bool((err[inside] <= step[inside] / 2 + 1e-6).all())
    assert bool((err[~inside] <= step[~inside] + 1e-6).all())
    if not fmt.symmetric:
        assert bool(inside.all())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_symmetric_rtn_follows_q4_0_rule(bits: int) -> None:
    """llama.cpp's Q4_0 rule at every width: s = fp16(m / -2^(b-1)) for the signed value m of
    largest magnitude, which gets code 0 (the level -2^(b-1)); no level is wasted."""
    torch.manual_seed(1)
    w = torch.randn(5, 64)
    w[0, 3] = 9.0  # a positive maximum: the scale is negative
    fmt = QuantFormat(bits=bits, group_size=32)
    qt = quantize(w, fmt)
    half = 1 << (bits - 1)
    g = w.reshape(5, 2, 32)
    m = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(qt.scales, (m / -half).half())
    codes = qt.codes.reshape(5, 2, 32)
    at_max = torch.gather(codes, -1, g.abs().argmax(-1, keepdim=True))[..., 0]
    assert bool((at_max == 0).all())
    assert float(qt.scales[0, 0]) < 0
    # Every code is in use over a large random tensor (no wasted level).
    big = quantize(torch.randn(64, 4096), QuantFormat(bits=bits, group_size=32))
    assert set(big.codes.unique().tolist()) == set(range(1 << bits))


def test_rtn_is_exact_on_grid_values() -> None:
    fmt = QuantFormat(bits=3)
    # Multiples of 0.5 whose value of largest magnitude is -2.0 = -4 * 0.5: levels -4..3.
    w = torch.tensor([[-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]])
    assert torch.equal(fake_quantize(w, fmt), w)
    assert torch.equal(fake_quantize(-w[:, :-1], fmt), -w[:, :-1])  # max +2.0: scale -0.5


def test_asymmetric_zero_point_represents_zero_exactly() -> None:
    fmt = QuantFormat(bits=4, symmetric=False)
    w = torch.tensor([[0.1, 0.7, 0.0, 2.3, 1.1, 0.0, 0.4, 3.0]])
    out = fake_quantize(w, fmt)
    assert out[0, 2] == 0 and out[0, 5] == 0


def test_keep_format_rounds_to_fp16() -> None:
    w = torch.tensor([[1.0 + 2**-12, 3.0]])
    assert torch.equal(fake_quantize(w, QuantFormat(bits=16)), w.half().float())


def test_group_size_must_divide_row() -> None:
    with pytest.raises(MpqError, match="does not divide"):
        quantize(torch.randn(4, 48), QuantFormat(bits=4, group_size=32))
