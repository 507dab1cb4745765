"""Modules that hold packed low-bit weights and run them on an explicit kernel backend.

Each quantized module stores exactly the tensors the cost model counts: ``qweight`` (int32 words,
one packed row per output channel, see :mod:`mpq.kernels.packing`), ``scales`` (``[rows, groups]``
in the format's scale dtype) and, for asymmetric formats, ``qzeros`` (one packed stream of
``rows * groups`` zero-points). A weight kept at 16 bits is a float16 ``weight`` buffer. A ``:dq``
format (:mod:`mpq.quant.dq`) stores ``qscales`` (one packed stream of ``rows * groups`` scale codes)
and ``super_scales`` (``[rows, ceil(cols / 256)]`` at the scale dtype) instead of ``scales``,
plus ``qmins`` and ``super_mins`` when asymmetric; its float32 group scales are computed from
them (:meth:`PackedWeight.group_scales`).

``QuantLinear`` runs its matmul on the backend it was given (:mod:`mpq.kernels.backends`) and
reports it in ``backend`` (``kernel`` says which op). Backends may keep runtime-only tensors
(non-persistent buffers, never in the state dict: the CPU int4 op's repacked codes); every
module's :meth:`runtime_bytes` counts them. ``QuantConv2d`` and ``QuantEmbedding`` run the
reference path. Layer inputs are fake-quantized first when the format has ``act_bits < 16``
(:mod:`mpq.quant.act_quant`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpq.errors import MpqError
from mpq.formats import (
    KEEP_BITS,
    QuantFormat,
    hi_cols,
    hi_rows,
    matrix_shape,
    n_groups,
    n_supers,
)
from mpq.kernels.backends import REFERENCE_KERNEL, Backend, KernelChoice
from mpq.kernels.checks import KernelOperands
from mpq.kernels.packing import pack, pack_codes, padding_is_zero, unpack, unpack_codes
from mpq.kernels.reference import BACKEND as REFERENCE
from mpq.quant.act_quant import DEFAULT_ACT_QUANT, ActQuant, apply_act_quant
from mpq.quant.core import DoubleQuant
from mpq.quant.dq import dequantize_dq, effective, take_rows
from mpq.quant.quantize import (
    QuantizedTensor,
    dequantize_codes,
    keep_weight,
    quantize,
    scale_torch_dtype,
)


class PackedWeight(nn.Module):
    """Packed storage of one weight and its reference dequantization.

    ``PackedWeight(weight, fmt)`` quantizes with round-to-nearest;
    :meth:`from_quantized` packs an existing result (GPTQ); :meth:`empty` allocates the exact
    buffers a format needs, to be filled by ``load_state_dict`` (then call :meth:`check`).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    weight: torch.Tensor
    qscales: torch.Tensor
    super_scales: torch.Tensor
    qmins: torch.Tensor
    super_mins: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor | None,
        fmt: QuantFormat,
        *,
        quantized: QuantizedTensor | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.fmt = fmt
        if weight is not None:
            shape = tuple(weight.shape)
        elif quantized is not None:
            shape = quantized.shape
        if shape is None:
            raise ValueError("PackedWeight needs a weight, a quantized tensor or a shape")
        self.shape = tuple(shape)
        self.rows, self.cols = matrix_shape(self.shape)
        if weight is None and quantized is None:  # empty: exact shapes, zero contents
            for name, (shp, dtype) in expected_buffers(self.shape, fmt).items():
                self.register_buffer(name, torch.zeros(shp, dtype=dtype))
            if "qzeros" not in expected_buffers(self.shape, fmt):
                self.qzeros = None
            return
        if fmt.hi is not None or (quantized is not None and quantized.parts is not None):
            raise MpqError(
                f"{fmt.spec()} is row-mixed: one PackedWeight holds one format; pack it as a "
                f"RowMixLinear (apply_plan does)"
            )
        if fmt.keep:
            assert weight is not None, "a keep format stores the weight itself"
            self.register_buffer("weight", keep_weight(weight))
            return
        if quantized is not None:
            qt = quantized
        else:
            assert weight is not None
            qt = quantize(weight, fmt)
        if qt.fmt.bits != fmt.bits or qt.shape != self.shape:
            raise MpqError(
                f"quantized tensor {qt.shape} at {qt.fmt.spec()} does not match "
                f"{self.shape} at {fmt.spec()}"
            )
        self.register_buffer("qweight", pack_codes(qt.codes, fmt.bits))
        if fmt.dq_bits is not None:
            assert qt.dq is not None, "a :dq format carries its scale codes"
            self._register_dq(qt.dq)
            self.qzeros = None
            return
        self.register_buffer("scales", qt.scales.to(scale_torch_dtype(fmt)))
        if qt.zeros is not None:
            self.register_buffer("qzeros", pack(qt.zeros.reshape(1, -1), fmt.bits))
        else:
            self.qzeros = None

    def _register_dq(self, dq: DoubleQuant) -> None:
        k = self.fmt.dq_bits
        assert k is not None
        self.register_buffer("qscales", pack(dq.scale_codes.reshape(1, -1), k))
        self.register_buffer("super_scales", dq.super_scales.to(scale_torch_dtype(self.fmt)))
        if dq.min_codes is not None and dq.super_mins is not None:
            self.register_buffer("qmins", pack(dq.min_codes.reshape(1, -1), k))
            self.register_buffer("super_mins", dq.super_mins.to(scale_torch_dtype(self.fmt)))

    def double_quant(self) -> DoubleQuant:
        """The stored scale codes of a ``:dq`` format, unpacked."""
        k = self.fmt.dq_bits
        assert k is not None, "not a :dq format"
        groups = n_groups(self.cols, self.fmt)
        n = self.rows * groups
        codes = unpack(self.qscales, k, n).reshape(self.rows, groups)
        if self.fmt.symmetric:
            return DoubleQuant(self.super_scales, codes)
        mins = unpack(self.qmins, k, n).reshape(self.rows, groups)
        return DoubleQuant(self.super_scales, codes, self.super_mins, mins)

    def group_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 group scales ``[rows, groups]`` and, for asymmetric :dq formats, the float32
        mins (``w = s * u - m``); otherwise the stored scales and None."""
        if self.fmt.dq_bits is None:
            return self.scales.float(), None
        return effective(self.double_quant(), self.fmt)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor) -> PackedWeight:
        return cls(None, qt.fmt, quantized=qt)

    @classmethod
    def empty(cls, shape: tuple[int, ...], fmt: QuantFormat) -> PackedWeight:
        return cls(None, fmt, shape=tuple(shape))

    @property
    def group(self) -> int:
        """Columns per scale (``cols`` when per channel)."""
        return self.fmt.group_size or self.cols

    def zeros(self) -> torch.Tensor | None:
        if self.qzeros is None:
            return None
        assert self.fmt.dq_bits is None
        groups = self.scales.shape[1]
        return unpack(self.qzeros, self.fmt.bits, self.rows * groups).reshape(self.rows, groups)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Unsigned codes ``[rows, cols]`` (uint8), as :func:`mpq.quant.quantize.quantize` gives
        them."""
        qweight = self.qweight if rows is None else self.qweight[rows]
        return unpack_codes(qweight, self.fmt.bits, self.cols)

    def dequantize_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 matrix ``[len(rows), cols]`` (all rows when ``rows`` is None)."""
        if self.fmt.keep:
            w = self.weight.reshape(self.rows, self.cols)
            return (w if rows is None else w[rows]).float()
        if self.fmt.dq_bits is not None:
            dq = self.double_quant()
            return dequantize_dq(self.codes(rows), dq if rows is None else take_rows(dq, rows),
                                 self.fmt)  # fmt: skip
        scales = self.scales if rows is None else self.scales[rows]
        zeros = self.zeros()
        if zeros is not None and rows is not None:
            zeros = zeros[rows]
        return dequantize_codes(self.codes(rows), scales, zeros, self.fmt)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows().reshape(self.shape).to(dtype)

    def operands(self, bias: torch.Tensor | None = None) -> KernelOperands:
        """What a kernel launch reads (:mod:`mpq.kernels.checks`); not for a kept weight."""
        if self.fmt.keep:
            raise MpqError("a weight kept at 16 bits has no packed operands; use F.linear")
        if self.fmt.dq_bits is not None:
            raise MpqError(
                f"{self.fmt.spec()}: the Triton/CuPy kernels do not read double-quantized scales; "
                f"use backend 'reference' or 'cpu'"
            )
        if self.fmt.grid != "int":
            raise MpqError(
                f"{self.fmt.spec()}: the Triton/CuPy kernels do not read the {self.fmt.grid!r} "
                f"level table; use backend 'reference'"
            )
        return KernelOperands(
            self.qweight, self.scales, self.qzeros, bias, self.fmt.bits, self.cols, self.group
        )

    def check(self, name: str = "weight") -> None:
        """Raise :class:`MpqError` when the buffers are not what ``fmt`` stores for ``shape``
        (wrong shape or dtype, nonzero padding bits, non-finite or negative scales): the sign of
        packed tensors edited or loaded for another plan."""
        for key, (shp, dtype) in expected_buffers(self.shape, self.fmt).items():
            t = getattr(self, key)
            if tuple(t.shape) != shp or t.dtype != dtype:
                raise MpqError(
                    f"{name}.{key}: expected {dtype} {list(shp)} for a {list(self.shape)} weight "
                    f"at {self.fmt.spec()}, found {t.dtype} {list(t.shape)}; the packed tensors "
                    f"do not belong to this plan"
                )
        if self.fmt.keep:
            return
        if not padding_is_zero(self.qweight, self.fmt.bits, self.cols):
            raise MpqError(f"{name}.qweight: padding bits are set; the packed codes were edited")
        if self.fmt.dq_bits is not None:
            n = self.rows * n_groups(self.cols, self.fmt)
            asym = not self.fmt.symmetric
            for key in ("qscales", "qmins") if asym else ("qscales",):
                if not padding_is_zero(getattr(self, key), self.fmt.dq_bits, n):
                    raise MpqError(
                        f"{name}.{key}: padding bits are set; the scale codes were edited"
                    )
            for key in ("super_scales", "super_mins") if asym else ("super_scales",):
                if not bool(torch.isfinite(getattr(self, key).float()).all()):
                    raise MpqError(f"{name}.{key}: non-finite super-scales; the file is corrupt")
            return
        if self.qzeros is not None and not padding_is_zero(
            self.qzeros, self.fmt.bits, self.scales.numel()
        ):
            raise MpqError(f"{name}.qzeros: padding bits are set; the zero-points were edited")
        s = self.scales.float()
        bad = (s == 0) if self.fmt.symmetric else (s <= 0)  # symmetric scales carry a sign
        if not bool(torch.isfinite(s).all()) or bool(bad.any()):
            raise MpqError(
                f"{name}.scales: non-finite, zero or (asymmetric) non-positive scales; the file "
                f"is corrupt"
            )

    def extra_repr(self) -> str:
        return f"shape={self.shape}, format={self.fmt.spec()}"


def expected_buffers(
    shape: tuple[int, ...], fmt: QuantFormat
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The buffers (name -> shape, dtype) a :class:`PackedWeight` of ``shape`` in ``fmt`` holds."""
    rows, cols = matrix_shape(tuple(shape))
    if fmt.keep:
        return {"weight": (tuple(shape), torch.float16)}
    groups = n_groups(cols, fmt)
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "qweight": ((rows, -(-cols * fmt.bits // 32)), torch.int32),
    }
    if fmt.dq_bits is not None:
        stream = ((1, -(-rows * groups * fmt.dq_bits // 32)), torch.int32)
        supers = ((rows, n_supers(cols)), scale_torch_dtype(fmt))
        out |= {"qscales": stream, "super_scales": supers}
        if not fmt.symmetric:
            out |= {"qmins": stream, "super_mins": supers}
        return out
    out["scales"] = ((rows, groups), scale_torch_dtype(fmt))
    if not fmt.symmetric:
        out["qzeros"] = ((1, -(-rows * groups * fmt.bits // 32)), torch.int32)
    return out


def _act_quant(x: torch.Tensor, fmt: QuantFormat, cfg: ActQuant, channel_dim: int) -> torch.Tensor:
    if fmt.act_bits == KEEP_BITS:
        return x
    return apply_act_quant(x, fmt.act_bits, cfg, channel_dim)


def _runtime_bytes(module: nn.Module) -> int:
    """Bytes of the module's non-persistent buffers (backend caches, not in the state dict)."""
    names: set[str] = getattr(module, "_non_persistent_buffers_set", set())
    return sum(
        b.numel() * b.element_size()
        for n, b in module.named_buffers(recurse=False)
        if n in names and b is not None
    )


class QuantLinear(nn.Module):
    """``nn.Linear`` with a packed weight, run on ``backend`` (see :mod:`mpq.kernels.backends`)."""

    def __init__(
        self,
        packed: PackedWeight,
        bias: torch.Tensor | None,
        backend: str = "reference",
        act: ActQuant = DEFAULT_ACT_QUANT,
        name: str = "linear",
    ) -> None:
        super().__init__()
        self.packed = packed
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )
        self.act = act
        self.layer_name = name
        self.requested = "reference"
        self.kernel_choice = REFERENCE_KERNEL
        self._impl: Backend | None = None
        self.set_backend(backend)

    @property
    def fmt(self) -> QuantFormat:
        return self.packed.fmt

    @property
    def backend(self) -> str:
        """The backend that runs the matmul (``auto`` resolved; ``reference`` where the chosen
        backend hands a format it has no kernel for back to the reference)."""
        return self.kernel_choice.backend

    @property
    def kernel(self) -> str:
        return self.kernel_choice.kernel

    def set_backend(self, backend: str) -> None:
        """Choose the backend (``auto`` resolves on the device the layer is on now)."""
        from mpq.kernels import backends as B

        B.check_request(backend)
        p = self.packed
        B.check_layer(backend, self.layer_name, "linear", p.rows, p.cols, p.fmt)
        device = (p.weight if p.fmt.keep else p.qweight).device
        chosen = B.get(B.resolve(backend, device.type))
        self.requested = backend
        for key in self.kernel_choice.buffers:
            self._buffers.pop(key, None)
            self._non_persistent_buffers_set.discard(key)
        if p.fmt.keep:
            choice = KernelChoice("reference", "float16 weight + F.linear")
        elif (p.fmt.dq_bits is not None or p.fmt.grid != "int") and chosen.launches_kernels:
            # 'auto' on a GPU: no Triton/CuPy kernel reads :dq scales or nl/nf4 level tables
            choice = REFERENCE_KERNEL
        else:
            choice = chosen.prepare(p)
        for key, value in choice.buffers.items():
            self.register_buffer(key, value, persistent=False)
        self.kernel_choice = choice
        self._impl = None if choice.backend == "reference" else B.get(choice.backend)

    def runtime_bytes(self) -> int:
        return _runtime_bytes(self)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self._impl is None or self.packed.fmt.keep or x2.shape[0] == 0:
            return REFERENCE.linear(self, x2)
        return self._impl.linear(self, x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _act_quant(x, self.fmt, self.act, -1)
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"backend={self.backend}, kernel={self.kernel}"


class QuantConv2d(nn.Module):
    """``nn.Conv2d`` with a packed weight (reference backend)."""

    def __init__(
        self, packed: PackedWeight, conv: nn.Conv2d, act: ActQuant = DEFAULT_ACT_QUANT
    ) -> None:
        super().__init__()
        self.packed = packed
        self.bias = (
            nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
            if conv.bias is not None
            else None
        )
        self.conv_args: dict[str, Any] = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
        }
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported")
        self.act = act
        self.backend = "reference"

    def runtime_bytes(self) -> int:
        return _runtime_bytes(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _act_quant(x, self.packed.fmt, self.act, 1)
        return F.conv2d(x, self.packed.dequantize(x.dtype), self.bias, **self.conv_args)


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` with a packed table; only the looked-up rows are dequantized."""

    def __init__(self, packed: PackedWeight, emb: nn.Embedding) -> None:
        super().__init__()
        self.packed = packed
        self.padding_idx = emb.padding_idx
        self.backend = "reference"
        if emb.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm is not supported")

    def runtime_bytes(self) -> int:
        return _runtime_bytes(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.packed.dequantize_rows(flat)
        return rows.reshape(*ids.shape, self.packed.cols)


class RowMixLinear(nn.Module):
    """``nn.Linear`` with a row-mixed weight (:mod:`mpq.quant.rowmix`): ``low`` and ``high`` are
    :class:`QuantLinear` layers over their own output rows (in order), ``rowmask`` the packed
    1-bit mask of the high rows (one 32-bit-word stream, as :func:`mpq.cost.weight_bits`
    counts it). The output interleaves the two parts' outputs back into row order."""

    rowmask: torch.Tensor
    _MASK = "rowmask"  # the packed mask's buffer name
    _UNITS = "rows"  # what the mask selects (error messages, repr)

    def __init__(
        self, low: QuantLinear, high: QuantLinear, mask: torch.Tensor, fmt: QuantFormat
    ) -> None:
        super().__init__()
        self.low, self.high, self.fmt = low, high, fmt
        self.rows = int(mask.numel())  # mask length: output rows (input columns: ColMixLinear)
        self.register_buffer(self._MASK, pack(mask.reshape(1, -1).to(torch.uint8), 1))
        # (the mask buffer, its in-place version, device) -> (low, high, order) indices: the
        # mask is unpacked once, not per call, and follows load_state_dict / .to() (the buffer
        # is held here, so a new buffer can never pass for it)
        self._index: tuple[torch.Tensor, int, torch.device, tuple[torch.Tensor, ...]] | None = None

    @classmethod
    def build(
        cls,
        qt: QuantizedTensor,
        bias: torch.Tensor | None,
        backend: str,
        act: ActQuant,
        name: str,
    ) -> RowMixLinear:
        """The packed layer of a row-mixed quantized weight (``bias``: the full-row bias)."""
        from mpq.quant.rowmix import low_part

        assert qt.parts is not None
        mask = qt.parts.mask
        low = PackedWeight.from_quantized(low_part(qt))
        high = PackedWeight.from_quantized(qt.parts.high)
        lo_b, hi_b = (None, None) if bias is None else cls._split_bias(bias, mask)
        return cls(
            QuantLinear(low, lo_b, backend=backend, act=act, name=f"{name}.low"),
            QuantLinear(high, hi_b, backend=backend, act=act, name=f"{name}.high"),
            mask,
            qt.fmt,
        )

    @staticmethod
    def _split_bias(
        bias: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The low and high parts' biases: each part's rows."""
        return bias[~mask], bias[mask]

    def _high_count(self) -> tuple[int, int]:
        """(high rows the format stores, rows the high part holds)."""
        return hi_rows(self.rows, self.fmt), self.high.packed.rows

    @classmethod
    def empty(
        cls, shape: tuple[int, ...], fmt: QuantFormat, bias: bool, act: ActQuant, name: str
    ) -> RowMixLinear:
        """Exact zero buffers of a row-mixed layer, to be filled by ``load_state_dict``."""
        assert fmt.hi is not None
        rows, cols = matrix_shape(shape)
        k = hi_rows(rows, fmt)

        def part(n: int, f: QuantFormat, tag: str) -> QuantLinear:
            b = torch.zeros(n) if bias else None
            return QuantLinear(PackedWeight.empty((n, cols), f), b, act=act, name=f"{name}.{tag}")

        mask = torch.zeros(rows, dtype=torch.bool)
        return cls(part(rows - k, fmt.low, "low"), part(k, fmt.hi, "high"), mask, fmt)

    def mask(self) -> torch.Tensor:
        """The high rows (bool ``[rows]``)."""
        return unpack(getattr(self, self._MASK), 1, self.rows).reshape(-1).bool()

    def indices(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(low, high, order) int64 indices on ``device``: the low and high rows (columns) in
        order, and where each row of ``cat(low, high)`` goes back to. Computed once per mask
        buffer (a new buffer or an in-place change gives a new key), so the forward pass
        neither unpacks the mask nor indexes by a boolean mask (a host sync on GPUs)."""
        buf = getattr(self, self._MASK)
        got = self._index
        if got is None or got[0] is not buf or got[1] != buf._version or got[2] != device:
            mask = self.mask()
            low = torch.nonzero(~mask).reshape(-1)
            high = torch.nonzero(mask).reshape(-1)
            order = torch.argsort(torch.cat([low, high]))
            got = (buf, buf._version, device, tuple(t.to(device) for t in (low, high, order)))
            self._index = got
        return got[3]

    def check(self, name: str = "weight") -> None:
        """:meth:`PackedWeight.check` of both parts, and a mask with exactly the format's
        number of high rows (columns) and clean padding."""
        self.low.packed.check(f"{name}.low")
        self.high.packed.check(f"{name}.high")
        if not padding_is_zero(getattr(self, self._MASK), 1, self.rows):
            raise MpqError(f"{name}.{self._MASK}: padding bits are set; the mask was edited")
        k = int(self.mask().sum())
        want, held = self._high_count()
        if k != want or held != k:
            raise MpqError(
                f"{name}.{self._MASK} marks {k} high {self._UNITS}; {self.fmt.spec()} stores "
                f"{want} of {self.rows}: the file is corrupt or edited"
            )

    def runtime_bytes(self) -> int:
        return 0  # the parts (QuantLinear modules) count their own

    @property
    def backend(self) -> str:
        return self.low.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.low(x), self.high(x)
        order = self.indices(lo.device)[2]
        return torch.cat([lo, hi], dim=-1).index_select(-1, order)

    def extra_repr(self) -> str:
        return f"{self._UNITS}={self.rows}, format={self.fmt.spec()}"


class ColMixLinear(RowMixLinear):
    """``nn.Linear`` with a column-mixed weight (:mod:`mpq.quant.rowmix`): ``low`` and ``high``
    are :class:`QuantLinear` layers over their own input columns (in order; the bias sits in
    ``low``), ``colmask`` the packed 1-bit mask of the high columns. The output is the sum of
    the two parts applied to their columns of the input."""

    colmask: torch.Tensor
    _MASK = "colmask"
    _UNITS = "columns"

    @staticmethod
    def _split_bias(
        bias: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The whole bias in ``low`` (the parts' outputs are summed)."""
        return bias, None

    def _high_count(self) -> tuple[int, int]:
        """(high columns the format stores, columns the high part holds)."""
        return hi_cols(self.rows, self.fmt), self.high.packed.cols

    @classmethod
    def empty(
        cls, shape: tuple[int, ...], fmt: QuantFormat, bias: bool, act: ActQuant, name: str
    ) -> ColMixLinear:
        """Exact zero buffers of a column-mixed layer, to be filled by ``load_state_dict``."""
        assert fmt.hi is not None
        rows, cols = matrix_shape(shape)
        k = hi_cols(cols, fmt)

        def part(n: int, f: QuantFormat, tag: str, b: torch.Tensor | None) -> QuantLinear:
            return QuantLinear(PackedWeight.empty((rows, n), f), b, act=act, name=f"{name}.{tag}")

        low = part(cols - k, fmt.low, "low", torch.zeros(rows) if bias else None)
        mask = torch.zeros(cols, dtype=torch.bool)
        return cls(low, part(k, fmt.hi, "high", None), mask, fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.indices(x.device)[:2]
        return self.low(x.index_select(-1, low)) + self.high(x.index_select(-1, high))
