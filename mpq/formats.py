"""`QuantFormat`: how one weight tensor is stored.

A format is data: bit-width of the codes, grouping, symmetry, the grid of code values, scale
dtype, method (how the codes are chosen), and the bits of the activations that feed the layer.
Its storage cost lives in :mod:`mpq.cost`, nowhere else.

Spec strings (CLI and configs): ``"4"``, ``"4:g128"``, ``"4:g128:asym"``, ``"3:asym:bf16"``,
``"4:g32:mse"``, ``"4:g32:nl"``, ``"8:a8"``, ``"16"`` (keep in high precision). Tokens after
the bits, in any order: ``g<N>`` group size (default: one group per output channel),
``sym``/``asym``, ``fp16``/``bf16``/``fp32`` scale dtype, ``rtn``/``mse``/``gptq`` method,
``nl``/``nf4`` non-uniform 4-bit grid (symmetric only), ``a<N>`` activation bits,
``dq``/``dq4``/``dq6``/``dq8`` double-quantized group scales (see :mod:`mpq.quant.dq`: each group's
scale, and min when asymmetric, is an N-bit code (``dq`` = 6) under one super-scale per 256
weights of a row, stored at the scale dtype; needs a group size that divides 256).

Methods (:mod:`mpq.quant.quantize` dispatches): ``rtn`` round to nearest on the min/max grid;
``mse`` a per-group search of the scale (and zero-point) that minimizes the reconstruction
error, weighted per input channel by the layer's importance when calibration statistics are
given; ``gptq`` GPTQ on the layer's input Hessian. Grids: ``int`` (uniform integers; the
symmetric grid is the full signed range ``-2^(b-1) .. 2^(b-1)-1``), ``nl`` (llama.cpp IQ4_NL's
16 values), ``nf4`` (QLoRA's NormalFloat-4). Every grid stores the same codes and scales, so
the storage of ``4:g32:nl`` is that of ``4:g32``.

**Row-mixed formats** (``"3:g32:dq:mse+4:g32:nl:dq:mse@25"``): a finer unit of allocation than
the layer. The weight's output rows are split between a low format (before ``+``) and a high
one (after it): the ``@P`` percent of rows (:func:`hi_rows`, rounded to whole rows) whose
error drops most from low to high (for ``mse`` parts weighted per input column by the layer's
importance, as ``mse`` weighs it) take the high format, the rest the low one; a 1-bit row mask
records which (:mod:`mpq.quant.rowmix`). Every format keeps its scales within rows, so each
row is exactly what its own format would store. Both parts share the method and the activation
bits; neither may be ``keep`` or ``gptq``, nor row-mixed itself.

**Column-mixed formats** (``"3:g32:dq:mse+4:g32:nl:dq:mse#11"``): the same across the *input*
columns. About ``P`` percent of the columns (:func:`hi_cols`, whole groups of both parts), those
whose importance-weighted error at the low format is largest, form their own ``[rows, k]``
matrix at the high format; the other columns form a ``[rows, cols - k]`` matrix at the low
format (its groups run over the remaining columns in order); a 1-bit column mask records which.
A few input channels with large second moments carry most of a layer's output error (OWQ's
observation), so this spends bits where they buy most (BENCHMARKS "Column-mixed formats").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from mpq.errors import MpqError

KEEP_BITS = 16
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_BITS = (*QUANT_BITS, KEEP_BITS)
SCALE_DTYPES = {"float16": 16, "bfloat16": 16, "float32": 32}
_SCALE_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
METHODS = ("rtn", "mse", "gptq")
# Methods whose result depends on calibration statistics of the layer inputs.
DATA_METHODS = ("mse", "gptq")
GRIDS = ("int", "nl", "nf4")
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
DQ_BITS = (4, 6, 8)
SUPER_BLOCK = 256
MIX_AXES = ("rows", "cols")


@dataclass(frozen=True)
class QuantFormat:
    """Storage of one weight: ``bits`` codes (2..8) or 16 = kept as float16.

    ``group_size=None`` means one scale (and zero-point) per output channel; otherwise one per
    ``group_size`` consecutive input weights of a row. ``grid`` is the set of code values
    (``int``: uniform; ``nl``/``nf4``: a 16-value 4-bit table, symmetric formats only).
    ``act_bits`` is the bit-width of the layer's input activations (16 = not quantized), used by
    BOPs budgets.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float16"
    method: str = "rtn"
    act_bits: int = 16
    dq_bits: int | None = None
    grid: str = "int"
    # Row-mixed: ``hi_pct`` percent of the rows (the ones that gain most) stored at ``hi``;
    # the other fields describe the low format of the remaining rows.
    hi: QuantFormat | None = None
    hi_pct: int = 0
    # ``"rows"`` (``LOW+HIGH@P``: output rows) or ``"cols"`` (``LOW+HIGH#P``: input columns).
    hi_axis: str = "rows"

    def __post_init__(self) -> None:
        for name in ("bits", "act_bits", "group_size", "dq_bits"):
            value = getattr(self, name)
            if value is None and name in ("group_size", "dq_bits"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise MpqError(f"{name}={value!r} must be an integer")
        if self.bits not in SUPPORTED_BITS:
            raise MpqError(
                f"bits={self.bits} is not supported: use one of {list(QUANT_BITS)} "
                f"or {KEEP_BITS} (keep in high precision)"
            )
        if self.group_size is not None and (self.group_size < 1):
            raise MpqError(f"group_size={self.group_size} must be a positive integer or None")
        if self.scale_dtype not in SCALE_DTYPES:
            raise MpqError(
                f"scale_dtype={self.scale_dtype!r} is unknown: use one of {sorted(SCALE_DTYPES)}"
            )
        if self.method not in METHODS:
            raise MpqError(f"method={self.method!r} is unknown: use one of {list(METHODS)}")
        if self.act_bits not in ACT_BITS:
            raise MpqError(
                f"act_bits={self.act_bits} is not supported: use one of {list(ACT_BITS)}"
            )
        if self.dq_bits is not None:
            if self.dq_bits not in DQ_BITS:
                raise MpqError(
                    f"dq_bits={self.dq_bits} is not supported: double-quantized scales are "
                    f"{list(DQ_BITS)}-bit codes (tokens dq4, dq/dq6, dq8)"
                )
            if self.group_size is None or SUPER_BLOCK % self.group_size:
                raise MpqError(
                    f"format {self.bits}:dq needs a group size that divides the {SUPER_BLOCK}-"
                    f"weight super-block (g16, g32, g64, g128 or g256), got "
                    f"{'per channel' if self.group_size is None else self.group_size}"
                )
            if self.keep:
                raise MpqError("a kept (16-bit) weight has no scales to double-quantize")
        if self.grid not in GRIDS:
            raise MpqError(f"grid={self.grid!r} is unknown: use one of {list(GRIDS)}")
        if self.grid != "int" and (self.bits != 4 or not self.symmetric):
            raise MpqError(
                f"grid {self.grid!r} is a 16-value table for symmetric 4-bit formats; "
                f"use bits=4 without asym (e.g. '4:g32:{self.grid}') or the int grid"
            )
        self._check_mix()

    def _check_mix(self) -> None:
        if self.hi_axis not in MIX_AXES:
            raise MpqError(f"hi_axis={self.hi_axis!r} is unknown: use one of {list(MIX_AXES)}")
        if self.hi is None:
            if self.hi_pct or self.hi_axis != "rows":
                raise MpqError(f"hi_pct={self.hi_pct} needs a high format (hi=...)")
            return
        sep, what = ("@", "row") if self.hi_axis == "rows" else ("#", "column")
        spec = f"{self.low.spec()}+{self.hi.spec()}{sep}{self.hi_pct}"
        if isinstance(self.hi_pct, bool) or not isinstance(self.hi_pct, int):
            raise MpqError(f"format {spec!r}: the {what} percent must be an integer")
        if not 1 <= self.hi_pct <= 99:
            raise MpqError(
                f"format {spec!r}: the {what} percent after {sep!r} must be 1..99 (0 or 100 "
                f"is the plain low or high format; give that instead)"
            )
        if self.hi.hi is not None:
            raise MpqError(f"format {spec!r}: the high part cannot be row-mixed itself")
        if self.keep or self.hi.keep:
            raise MpqError(f"format {spec!r}: both parts of a row-mixed format must quantize")
        if "gptq" in (self.method, self.hi.method):
            raise MpqError(
                f"format {spec!r}: GPTQ parts cannot be row-mixed (the rows are chosen by "
                f"rounding error); use mse or rtn parts"
            )
        if self.method != self.hi.method or self.act_bits != self.hi.act_bits:
            raise MpqError(
                f"format {spec!r}: both parts need the same method and activation bits "
                f"(got {self.method}/{self.hi.method}, a{self.act_bits}/a{self.hi.act_bits})"
            )
        if self.hi == self.low:
            raise MpqError(f"format {spec!r}: the two parts are the same format")

    @property
    def code_bits(self) -> float:
        """Bits per code, averaged over rows for a row-mixed format (plots and summaries; the
        stored bits are :func:`mpq.cost.weight_bits`)."""
        if self.hi is None:
            return float(self.bits)
        return self.bits + (self.hi.bits - self.bits) * self.hi_pct / 100

    @property
    def low(self) -> QuantFormat:
        """The format of the rows that do not take ``hi`` (the format itself when not mixed)."""
        if self.hi is None:
            return self
        return dataclasses.replace(self, hi=None, hi_pct=0, hi_axis="rows")

    @property
    def keep(self) -> bool:
        """True when the weight stays in high precision (float16)."""
        return self.bits == KEEP_BITS

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def spec(self) -> str:
        """The canonical spec string; ``QuantFormat.parse(f.spec()) == f``."""
        if self.hi is not None:
            sep = "@" if self.hi_axis == "rows" else "#"
            return f"{self.low.spec()}+{self.hi.spec()}{sep}{self.hi_pct}"
        if self.keep:
            return "16" if self.act_bits == KEEP_BITS else f"16:a{self.act_bits}"
        parts = [str(self.bits)]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if not self.symmetric:
            parts.append("asym")
        if self.scale_dtype != "float16":
            parts.append({v: k for k, v in _SCALE_ALIASES.items()}[self.scale_dtype])
        if self.dq_bits is not None:
            parts.append("dq" if self.dq_bits == 6 else f"dq{self.dq_bits}")
        if self.grid != "int":
            parts.append(self.grid)
        if self.method != "rtn":
            parts.append(self.method)
        if self.act_bits != KEEP_BITS:
            parts.append(f"a{self.act_bits}")
        return ":".join(parts)

    def __str__(self) -> str:
        return self.spec()

    @classmethod
    def parse(cls, spec: str) -> QuantFormat:
        """Parse a spec string such as ``"4:g128:asym"`` (see the module docstring)."""
        if str(spec).count("+") > 1:
            raise MpqError(f"format {spec!r}: a row-mixed format has two parts (one '+')")
        if "+" in str(spec):
            low, _, rest = str(spec).partition("+")
            sep = "#" if "#" in rest else "@"
            high, at, pct = rest.rpartition(sep)
            if not at or not pct.strip().isdigit() or not high.strip() or "@" in high:
                raise MpqError(
                    f"format {spec!r}: a row-mixed format is LOW+HIGH@PERCENT, e.g. "
                    f"'3:g32:mse+4:g32:mse@25' (25 % of the rows at the high format), a "
                    f"column-mixed one LOW+HIGH#PERCENT (of the input columns)"
                )
            return dataclasses.replace(
                cls.parse(low), hi=cls.parse(high), hi_pct=int(pct),
                hi_axis="rows" if sep == "@" else "cols",
            )  # fmt: skip
        tokens = [t.strip().lower() for t in str(spec).split(":") if t.strip()]
        if not tokens or not tokens[0].isdigit():
            raise MpqError(
                f"format {spec!r} must start with the bit-width, e.g. '4', '4:g128:asym' or '16'"
            )
        kwargs: dict[str, Any] = {"bits": int(tokens[0])}
        seen: dict[str, str] = {}
        value: Any
        for tok in tokens[1:]:
            if tok.startswith("g") and tok[1:].isdigit():
                key, value = "group_size", int(tok[1:])
            elif tok in ("sym", "asym"):
                key, value = "symmetric", tok == "sym"
            elif tok in _SCALE_ALIASES:
                key, value = "scale_dtype", _SCALE_ALIASES[tok]
            elif tok in METHODS:
                key, value = "method", tok
            elif tok in GRIDS and tok != "int":
                key, value = "grid", tok
            elif tok.startswith("a") and tok[1:].isdigit():
                key, value = "act_bits", int(tok[1:])
            elif tok == "dq" or (tok.startswith("dq") and tok[2:].isdigit()):
                key, value = "dq_bits", int(tok[2:] or 6)
            else:
                raise MpqError(
                    f"format {spec!r}: unknown token {tok!r}; expected g<N>, sym, asym, "
                    f"fp16, bf16, fp32, rtn, mse, gptq, nl, nf4, a<N> or dq/dq<N>"
                )
            if key in seen:
                raise MpqError(
                    f"format {spec!r} sets {key} twice ({seen[key]!r} and {tok!r}); give each "
                    f"setting once, e.g. '4:g128:asym'"
                )
            seen[key] = tok
            kwargs[key] = value
        if kwargs["bits"] == KEEP_BITS:
            kwargs = {"bits": KEEP_BITS, "act_bits": kwargs.get("act_bits", KEEP_BITS)}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON; a plain format omits the row-mix fields (so plans and cache
        keys written before row-mixed formats existed stay valid)."""
        out = asdict(self)
        if self.hi_axis == "rows":  # row-mixed plans written before column mixes stay valid
            del out["hi_axis"]
        if self.hi is None:
            del out["hi"], out["hi_pct"]
        else:
            out["hi"] = self.hi.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> QuantFormat:
        if not isinstance(data, dict):
            raise MpqError(f"a format must be a JSON object, got {type(data).__name__}: {data!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown or "bits" not in data:
            raise MpqError(
                f"format {data!r}: unknown keys {sorted(unknown)} or missing 'bits'; "
                f"allowed keys are {sorted(known)}"
            )
        if data.get("hi") is not None:
            data = {**data, "hi": cls.from_dict(data["hi"])}
        return cls(**data)


KEEP = QuantFormat(bits=KEEP_BITS)


# ------------------------------------------------------------------ shapes (integer arithmetic)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``[rows, cols]`` view under which a weight of ``shape`` is quantized."""
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


def n_groups(cols: int, fmt: QuantFormat) -> int:
    """Groups per row; the group size must divide the row length (see :func:`check_format`)."""
    return 1 if fmt.group_size is None else cols // fmt.group_size


def n_supers(cols: int) -> int:
    """Super-blocks per row of a ``:dq`` format: ``ceil(cols / 256)`` (the last one may be
    shorter)."""
    return -(-cols // SUPER_BLOCK)


#: Codes are packed per row into words of this many bits (:mod:`mpq.kernels.packing`).
WORD_BITS = 32


def words_per_row(cols: int, bits: int) -> int:
    """Number of 32-bit words that hold one packed row of ``cols`` codes."""
    return -(-cols * bits // WORD_BITS)


def hi_rows(rows: int, fmt: QuantFormat) -> int:
    """How many of ``rows`` output rows a row-mixed ``fmt`` stores at its high format
    (``hi_pct`` percent, rounded half up; 0 when not row-mixed)."""
    return (rows * fmt.hi_pct + 50) // 100 if fmt.hi is not None and fmt.hi_axis == "rows" else 0


def col_unit(fmt: QuantFormat) -> int:
    """The column step of a column-mixed format: whole groups of both parts (their lcm)."""
    assert fmt.hi is not None
    return math.lcm(fmt.low.group_size or 1, fmt.hi.group_size or 1)


def hi_cols(cols: int, fmt: QuantFormat) -> int:
    """How many of ``cols`` input columns a column-mixed ``fmt`` stores at its high format:
    ``hi_pct`` percent rounded half up to whole :func:`col_unit` steps, at least one step and
    at most all but one (0 when not column-mixed)."""
    if fmt.hi is None or fmt.hi_axis != "cols":
        return 0
    unit = col_unit(fmt)
    steps = (2 * cols * fmt.hi_pct + 100 * unit) // (200 * unit)
    return max(1, min(steps, cols // unit - 1)) * unit


def check_format(shape: tuple[int, ...], fmt: QuantFormat, name: str = "weight") -> None:
    """Raise :class:`MpqError` when ``fmt`` cannot store a weight of ``shape``."""
    if fmt.hi is not None and fmt.hi_axis == "cols":
        rows, cols = matrix_shape(shape)
        unit = col_unit(fmt)
        if len(shape) != 2 or cols % unit or cols < 2 * unit:
            raise MpqError(
                f"{name}: column-mixed format {fmt.spec()} splits a matrix's {cols} input "
                f"columns in steps of {unit} (whole groups of both parts) and keeps at least one "
                f"step in each part; this weight (shape {list(shape)}) cannot be split so: use "
                f"a row-mixed (@) or plain format"
            )
        k = hi_cols(cols, fmt)
        check_format((rows, cols - k), fmt.low, name)
        check_format((rows, k), fmt.hi, name)
        return
    if fmt.hi is not None:
        check_format(shape, fmt.low, name)
        check_format(shape, fmt.hi, name)
        return
    if fmt.keep:
        return
    _, cols = matrix_shape(shape)
    if fmt.group_size is not None and cols % fmt.group_size != 0:
        divisors = [g for g in (32, 64, 128, 256) if cols % g == 0]
        raise MpqError(
            f"{name}: group size {fmt.group_size} does not divide its row length {cols}; "
            f"use per-channel (no g<N>) or one of the group sizes {divisors or 'none'}"
        )


def fits(shape: tuple[int, ...], fmt: QuantFormat) -> bool:
    """Whether ``fmt`` can store a weight of ``shape`` (:func:`check_format` passes)."""
    try:
        check_format(shape, fmt)
    except MpqError:
        return False
    return True
