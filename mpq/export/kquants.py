"""GGML k-quant blocks (256 weights each) from mpq's ``:dq`` codes, byte for byte.

Each packer inverts the matching ``gguf.quants`` dequantizer (the reference the tests check
against: ``gguf.quants.dequantize(blocks) == mpq.quant.dq.dequantize_dq(...)`` bit for bit).

=========  ======================  ====================================================
GGML type  mpq format              block layout (bytes)
=========  ======================  ====================================================
Q2_K       ``2:g16:asym:dq4``      scales[16] (sc | m << 4), qs[64], d, dmin      = 84
Q3_K       ``3:g16:dq``            hmask[32], qs[64], scales[12] (6-bit, +32), d  = 110
Q4_K       ``4:g32:asym:dq``       d, dmin, scales[12] (6-bit sc, m), qs[128]     = 144
Q5_K       ``5:g32:asym:dq``       d, dmin, scales[12], qh[32], qs[128]           = 176
Q6_K       ``6:g16:dq8``           ql[128], qh[64], scales[16] (int8), d          = 210
IQ4_XS     ``4:g32:nl:dq``         d, scales_h (uint16), scales_l[4], qs[128]     = 136
=========  ======================  ====================================================

IQ4_XS reads ``w = d * (c - 32) * kvalues[u]`` (llama.cpp IQ4_NL's 16 levels, mpq's ``nl``
grid).

``d``/``dmin`` are the fp16 super-scale and super-min; the symmetric types' scale codes are
mpq's unsigned codes (``signed + 2^(k-1)``): Q3_K stores them as they are, Q6_K as int8
(``code - 128``). Weight codes are mpq's unsigned codes (Q3_K: ``u - 4``; Q6_K: ``u - 32``).
"""

from __future__ import annotations

import numpy as np
import torch

from mpq.formats import SUPER_BLOCK, QuantFormat
from mpq.quant.core import DoubleQuant

# (bits, group size, symmetric, dq bits) -> GGML type, fp16 super-scales.
K_TYPES: dict[tuple[int, int, bool, int], str] = {
    (2, 16, False, 4): "Q2_K",
    (3, 16, True, 6): "Q3_K",
    (4, 32, False, 6): "Q4_K",
    (5, 32, False, 6): "Q5_K",
    (6, 16, True, 8): "Q6_K",
}
K_MAPS = (
    "2:g16:asym:dq4 -> Q2_K, 3:g16:dq -> Q3_K, 4:g32:asym:dq -> Q4_K, 5:g32:asym:dq -> Q5_K, "
    "6:g16:dq8 -> Q6_K, 4:g32:nl:dq -> IQ4_XS (rows of whole 256-weight super-blocks)"
)


def k_type_name(fmt: QuantFormat) -> str | None:
    """The k-quant type that stores the ``:dq`` format ``fmt`` exactly (None when none does)."""
    if fmt.dq_bits is None or fmt.group_size is None or fmt.scale_dtype != "float16":
        return None
    if fmt.grid == "nl":
        return "IQ4_XS" if (fmt.group_size, fmt.dq_bits) == (32, 6) else None
    if fmt.grid != "int":
        return None
    return K_TYPES.get((fmt.bits, fmt.group_size, fmt.symmetric, fmt.dq_bits))


def _f16(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().numpy().reshape(-1).view(np.uint8).reshape(-1, 2)


def _u8(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().numpy().astype(np.uint8)


def _bits_at(values: np.ndarray, width: int, per_byte: int) -> np.ndarray:
    """Bytes holding ``values [n, per_byte, m]`` (each < 2^width): value ``j`` of a byte's
    ``per_byte`` at bit ``j * width``; returns ``[n, m]``."""
    out = np.zeros(values.shape[::2], dtype=np.uint8)
    for j in range(per_byte):
        out |= (values[:, j, :].astype(np.uint8) & ((1 << width) - 1)) << (j * width)
    return out


def _scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (``get_scale_min_k4`` inverted)."""
    d = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


def _low_high(q: np.ndarray, chunk: int) -> np.ndarray:
    """Nibble pairs: per ``2 * chunk`` codes, byte ``l`` = code ``l`` | code ``chunk + l`` << 4."""
    n = q.shape[0]
    q = q.reshape(n, -1, 2, chunk)
    return ((q[:, :, 0, :] & 0x0F) | ((q[:, :, 1, :] & 0x0F) << 4)).reshape(n, -1).astype(np.uint8)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit fields: per 128 codes, byte ``l`` (of 32) holds code ``32 j + l`` at bit ``2 j``."""
    n = q.shape[0]
    q = q.reshape(n, -1, 4, 32)
    out = np.zeros((n, q.shape[1], 32), dtype=np.uint8)
    for j in range(4):
        out |= (q[:, :, j, :].astype(np.uint8) & 3) << (2 * j)
    return out.reshape(n, -1)


def iq4_xs_blocks(codes: torch.Tensor, dq: DoubleQuant) -> np.ndarray:
    """IQ4_XS blocks ``[rows, cols / 256 * 136]``: ``codes`` index llama.cpp's 16 IQ4_NL levels,
    ``dq`` holds unsigned 6-bit scale codes (``signed + 32``) and fp16 super-scales."""
    rows, cols = codes.shape
    assert cols % SUPER_BLOCK == 0, "IQ4_XS needs rows of whole 256-weight super-blocks"
    q = _u8(codes).reshape(-1, SUPER_BLOCK)
    n = q.shape[0]
    sc = _u8(dq.scale_codes).reshape(n, 8)
    high = np.zeros(n, dtype=np.uint16)
    for i in range(8):
        high |= ((sc[:, i] >> 4) & 3).astype(np.uint16) << (2 * i)
    low = (sc[:, 0::2] & 0x0F) | ((sc[:, 1::2] & 0x0F) << 4)
    qs = _low_high(q, 16)
    parts = [_f16(dq.super_scales), high.reshape(n, 1).view(np.uint8), low, qs]
    return np.ascontiguousarray(np.concatenate(parts, axis=1).reshape(rows, -1))


def k_blocks(type_name: str, codes: torch.Tensor, dq: DoubleQuant) -> np.ndarray:
    """GGML blocks ``[rows, cols / 256 * type_size]`` (uint8) of a ``:dq`` weight whose rows are
    whole super-blocks (``codes [rows, cols]`` unsigned, ``dq`` its stored scale codes)."""
    if type_name == "IQ4_XS":
        return iq4_xs_blocks(codes, dq)
    rows, cols = codes.shape
    assert cols % SUPER_BLOCK == 0, "k-quants need rows of whole 256-weight super-blocks"
    q = _u8(codes).reshape(-1, SUPER_BLOCK)
    n = q.shape[0]
    sc = _u8(dq.scale_codes).reshape(n, -1)
    d = _f16(dq.super_scales)
    if type_name in ("Q2_K", "Q4_K", "Q5_K"):
        assert dq.min_codes is not None and dq.super_mins is not None
        mn = _u8(dq.min_codes).reshape(n, -1)
        dmin = _f16(dq.super_mins)
    if type_name == "Q2_K":
        parts = [(sc & 0x0F) | (mn << 4), _crumbs(q), d, dmin]
    elif type_name == "Q4_K":
        parts = [d, dmin, _scales_k4(sc, mn), _low_high(q, 32)]
    elif type_name == "Q5_K":
        high = (q >> 4).reshape(n, 8, 32)
        qh = np.zeros((n, 32), dtype=np.uint8)
        for j in range(8):
            qh |= (high[:, j, :] & 1) << j
        parts = [d, dmin, _scales_k4(sc, mn), qh, _low_high(q, 32)]
    elif type_name == "Q3_K":
        high = (q >> 2).reshape(n, 8, 32)
        hmask = np.zeros((n, 32), dtype=np.uint8)
        for j in range(8):
            hmask |= (high[:, j, :] & 1) << j
        low = np.concatenate([sc[:, :8] & 0x0F, sc[:, 8:] & 0x0F], axis=1)
        lsc = (low[:, :8] | (low[:, 8:] << 4)).astype(np.uint8)
        top = (sc >> 4) & 3  # scale k's high bits: byte k % 4, bits 2 * (k // 4)
        hsc = _bits_at(top.reshape(n, 4, 4), 2, 4)
        parts = [hmask, _crumbs(q & 3), lsc, hsc, d]
    elif type_name == "Q6_K":
        ql = _low_high(q & 0x0F, 64)
        qh = _crumbs(q >> 4)
        scales = (sc.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [ql, qh, scales, d]
    else:
        raise ValueError(f"not a k-quant type: {type_name}")
    blocks = np.concatenate(parts, axis=1)
    return np.ascontiguousarray(blocks.reshape(rows, -1))
