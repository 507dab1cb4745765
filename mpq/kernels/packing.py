"""Bit packing of integer codes into 32-bit words, bit-exact for every width 2..8.

Layout (documented bit by bit, shared by the reference executor and the cost model):
each row of a ``[rows, cols]`` code matrix is packed on its own into ``ceil(cols * bits / 32)``
words. Code ``j`` of a row occupies bits ``[j*bits, (j+1)*bits)`` of the row's little-endian bit
stream: bit ``k`` of the stream is bit ``k % 32`` of word ``k // 32``. Codes of 3, 5, 6 and 7 bits
may straddle two words. Unused high bits of a row's last word are zero. Words are stored as
``int32`` holding the unsigned 32-bit pattern.

What the quantized modules store (:class:`mpq.kernels.modules.PackedWeight`) on top of this:

- ``qweight`` ``[rows, words_per_row(cols, b)]``: the weight's codes, each stored as the b-bit
  field ``code XOR 2**(b-1)``, i.e. ``code - 2**(b-1)`` in b-bit two's complement
  (:func:`pack_codes`). For a symmetric format that field *is* the signed integer ``q``, so an
  8-bit row is a plain ``int8`` vector (``qweight.view(torch.int8)``, zero copy when
  ``cols % 4 == 0``), which is what the fused CPU int8 matmul reads. A GPU kernel reads the
  row's words and extracts code ``j`` from word ``j*b // 32`` (and the next word when
  ``(j*b) % 32 + b > 32``); 32 consecutive codes always fill exactly ``b`` whole words.
- ``scales`` ``[rows, groups]`` in the format's scale dtype (``groups = 1`` per channel).
- ``qzeros`` ``[1, words_per_row(rows * groups, b)]`` (asymmetric only): the unsigned integer
  zero-points as one stream, zero-point of (row ``r``, group ``g``) at index ``r * groups + g``.

Dequantized weight: ``(code - z) * scale`` with ``z = 2**(b-1)`` for symmetric formats, i.e.
``field * scale`` (symmetric) and ``(field + 2**(b-1) - z) * scale`` (asymmetric). The number of
bits is unchanged by the XOR: :func:`mpq.cost.weight_bits` counts these tensors exactly.
"""

from __future__ import annotations

import sys

import torch

from mpq.formats import WORD_BITS, words_per_row


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
    """Inverse of :func:`pack`: int32 words ``[rows, n_words]`` -> uint8 codes ``[rows, cols]``.

    Vectorized over whole words: for widths dividing 32 each word holds ``32 / bits`` codes at
    fixed shifts; for 3, 5, 6 and 7 bits every 32 codes fill exactly ``bits`` words, so code
    ``j`` of a 32-code chunk always comes from the same one or two words of the chunk at the
    same shift (int32 arithmetic, logical shifts emulated with masks).
    """
    if words.dim() != 2 or words.shape[1] != words_per_row(cols, bits):
        raise ValueError(
            f"expected words of shape [rows, {words_per_row(cols, bits)}] for {cols} codes at "
            f"{bits} bits, got {tuple(words.shape)}"
        )
    rows, n_words = words.shape
    dev = words.device
    w = words.to(torch.int32)
    mask = (1 << bits) - 1
    if bits == 8 and sys.byteorder == "little":  # the words' bytes are the codes
        return w.contiguous().view(torch.uint8)[:, :cols].clone()
    if WORD_BITS % bits == 0:
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=dev)
        out = (w.unsqueeze(-1) >> shifts) & mask  # arithmetic shift; the mask drops sign bits
        return out.reshape(rows, -1)[:, :cols].to(torch.uint8)
    chunks = -(-cols // WORD_BITS)
    w = torch.nn.functional.pad(w, (0, chunks * bits - n_words)).view(rows, chunks, bits)
    j = torch.arange(WORD_BITS, dtype=torch.int64, device=dev)
    first = (j * bits) // WORD_BITS
    shift = (j * bits) % WORD_BITS
    spill = shift + bits > WORD_BITS
    # Low part: only the 32 - shift bits that exist in the first word (no sign-extension bits).
    keep = torch.where(spill, (1 << (WORD_BITS - shift)) - 1, mask).to(torch.int32)
    lo = (w[:, :, first] >> shift.to(torch.int32)) & keep
    if bool(spill.any()):
        k = torch.nonzero(spill).flatten()
        hi = w[:, :, first[k] + 1] << (WORD_BITS - shift[k]).to(torch.int32)
        lo[:, :, k] |= hi & mask
    return lo.reshape(rows, chunks * WORD_BITS)[:, :cols].to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned weight codes as stored fields ``code XOR 2**(bits-1)`` (see module doc)."""
    return pack(codes.to(torch.int64) ^ (1 << (bits - 1)), bits)


def unpack_codes(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 unsigned codes ``[rows, cols]``."""
    return unpack(words, bits, cols) ^ (1 << (bits - 1))


def padding_is_zero(words: torch.Tensor, bits: int, cols: int) -> bool:
    """True when the unused high bits of every row's last word are zero (as :func:`pack` writes);
    a packed tensor edited by hand usually breaks this."""
    used = cols * bits - (words.shape[1] - 1) * WORD_BITS
    if words.numel() == 0 or used >= WORD_BITS:
        return True
    last = words[:, -1].to(torch.int64) & 0xFFFFFFFF
    return bool(((last >> used) == 0).all())


INT32_MAX = 2**31 - 1


def offsets_problem(rows: int, cols: int, bits: int, groups: int, batch: int = 0) -> str | None:
    """Why int32 offsets cannot index a ``[rows, cols]`` weight at ``bits`` with ``groups``
    scales per row (and, when ``batch > 0``, ``[batch, max(rows, cols)]`` activations), or None.
    """
    if rows * words_per_row(cols, bits) > INT32_MAX or rows * groups * bits > INT32_MAX:
        return f"a {rows}x{cols} weight at {bits} bits needs offsets beyond int32"
    if batch * max(rows, cols) > INT32_MAX:
        return f"a batch of {batch} rows of {max(rows, cols)} values needs offsets beyond int32"
    return None
