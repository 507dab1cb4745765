"""Packed storage for the kernels: every width 2..8, every group layout, bit-exact round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq.cost import weight_bits
from mpq.formats import QuantFormat, words_per_row
from mpq.kernels.modules import PackedWeight, expected_buffers
from mpq.kernels.packing import pack_codes, padding_is_zero, unpack, unpack_codes
from mpq.quant.quantize import dequantize, quantize

GROUPS = [32, 64, 128, None]


@pytest.mark.parametrize("bits", range(2, 9))
def test_stored_field_is_code_minus_half_in_twos_complement(bits: int) -> None:
    codes = torch.arange(1 << bits, dtype=torch.uint8).repeat(2, 3)
    words = pack_codes(codes, bits)
    fields = unpack(words, bits, codes.shape[1]).to(torch.int64)
    signed = torch.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields)
    assert torch.equal(signed, codes.to(torch.int64) - (1 << (bits - 1)))
    assert torch.equal(unpack_codes(words, bits, codes.shape[1]), codes)


def test_eight_bit_rows_are_int8_vectors() -> None:
    codes = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    words = pack_codes(codes, 8)
    assert torch.equal(words.view(torch.int8).to(torch.int64), codes.to(torch.int64) - 128)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from(GROUPS),
    symmetric=st.booleans(),
    rows=st.integers(1, 5),
    n_groups=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_weight_round_trips_codes_scales_zeros(
    bits: int, group: int | None, symmetric: bool, rows: int, n_groups: int, seed: int
) -> None:
    cols = (group or 40) * n_groups + (0 if group else 3)
    fmt = QuantFormat(bits=bits, group_size=group, symmetric=symmetric)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    qt = quantize(w, fmt)
    p = PackedWeight(w, fmt)
    assert torch.equal(p.codes(), qt.codes)
    assert torch.equal(p.scales, qt.scales)
    if symmetric:
        assert p.qzeros is None and p.zeros() is None
    else:
        assert torch.equal(p.zeros(), qt.zeros)
    assert torch.equal(p.dequantize(), dequantize(qt))
    # Every code value appears when the weight spans the grid; the layout has no spare bits.
    assert padding_is_zero(p.qweight, bits, cols)
    stored = sum(t.numel() * t.element_size() * 8 for t in p.state_dict().values())
    assert stored == weight_bits((rows, cols), fmt)
    assert {k: (tuple(v.shape), v.dtype) for k, v in p.state_dict().items()} == expected_buffers(
        (rows, cols), fmt
    )


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", GROUPS)
def test_all_code_values_survive_packed_weight(bits: int, group: int | None) -> None:
    # A weight whose rows hit every code: a ramp over the full grid, per group.
    cols = (group or 256) * 2
    ramp = torch.linspace(-1, 1, cols).repeat(3, 1)
    fmt = QuantFormat(bits=bits, group_size=group, symmetric=False)
    qt = quantize(ramp, fmt)
    assert int(qt.codes.min()) == 0 and int(qt.codes.max()) == (1 << bits) - 1
    p = PackedWeight(ramp, fmt)
    assert torch.equal(p.codes(), qt.codes)
    assert p.qweight.shape == (3, words_per_row(cols, bits))


def test_padding_check_sees_edited_bits() -> None:
    codes = torch.zeros(2, 10, dtype=torch.uint8)
    words = pack_codes(codes, 3)  # 30 bits used of 32
    assert padding_is_zero(words, 3, 10)
    words[1, 0] |= 1 << 31
    assert not padding_is_zero(words, 3, 10)
