"""Packing oracles: bit-exact round trips and the documented bit layout, for every width."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq.formats import words_per_row
from mpq.kernels.packing import pack, unpack


def _reference_pack(row: list[int], bits: int) -> list[int]:
    """The layout as documented, with Python integers: code j at bits [j*b, (j+1)*b)."""
    stream = 0
    for j, c in enumerate(row):
        stream |= c << (j * bits)
    n = words_per_row(len(row), bits)
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n)]


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_code_value_round_trips(bits: int) -> None:
    codes = torch.arange(1 << bits, dtype=torch.uint8).repeat(3, 5)  # all values, odd offsets
    assert torch.equal(unpack(pack(codes, bits), bits, codes.shape[1]), codes)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 4),
    cols=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_and_layout_match_reference(bits: int, rows: int, cols: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int64).to(
        torch.uint8
    )
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows, words_per_row(cols, bits))
    assert torch.equal(unpack(words, bits, cols), codes)
    for r in range(rows):
        expected = _reference_pack(codes[r].tolist(), bits)
        assert [w & 0xFFFFFFFF for w in words[r].tolist()] == expected


def test_words_per_row_pads_each_row_to_32_bits() -> None:
    assert words_per_row(576, 3) == 54  # 1728 bits exactly
    assert words_per_row(10, 3) == 1  # 30 bits
    assert words_per_row(11, 3) == 2  # 33 bits spill into a second word
    assert words_per_row(4, 8) == 1


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack(torch.tensor([[8]], dtype=torch.uint8), 3)
