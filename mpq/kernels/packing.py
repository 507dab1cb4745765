"""Bit packing of integer codes into 32-bit words, bit-exact for every width 2..8.

Layout (documented bit by bit, shared by the reference executor and the cost model):
each row of a ``[rows, cols]`` code matrix is packed on its own into ``ceil(cols * bits / 32)``
words. Code ``j`` of a row occupies bits ``[j*bits, (j+1)*bits)`` of the row's little-endian bit
stream: bit ``k`` of the stream is bit ``k % 32`` of word ``k // 32``. Codes of 3, 5, 6 and 7 bits
may straddle two words. Unused high bits of a row's last word are zero. Words are stored as
``int32`` holding the unsigned 32-bit pattern.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def words_per_row(cols: int, bits: int) -> int:
    """Number of 32-bit words that hold one packed row of ``cols`` codes."""
    return -(-cols * bits // WORD_BITS)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[rows, cols]`` (values in ``[0, 2**bits)``) into int32 words."""
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D code matrix, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"pack supports 1..8 bits, got {bits}")
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    n_words = words_per_row(cols, bits)
    offset = torch.arange(cols, dtype=torch.int64) * bits
    word = offset // WORD_BITS
    shift = offset % WORD_BITS
    out = torch.zeros(rows, n_words + 1, dtype=torch.int64)
    # Bits never overlap, so adding is the same as OR-ing.
    out.scatter_add_(1, word.expand(rows, cols), (c << shift) & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand(rows, cols), c >> (WORD_BITS - shift))
    out = out[:, :n_words]
    return torch.where(out >= (1 << 31), out - (1 << 32), out).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words ``[rows, n_words]`` -> uint8 codes ``[rows, cols]``."""
    if words.dim() != 2 or words.shape[1] != words_per_row(cols, bits):
        raise ValueError(
            f"expected words of shape [rows, {words_per_row(cols, bits)}] for {cols} codes at "
            f"{bits} bits, got {tuple(words.shape)}"
        )
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))
    offset = torch.arange(cols, dtype=torch.int64, device=words.device) * bits
    word = offset // WORD_BITS
    shift = offset % WORD_BITS
    lo = w[:, word] >> shift
    hi = w[:, word + 1] << (WORD_BITS - shift)
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8)
