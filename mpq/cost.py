"""The exact cost model: the only place where budget arithmetic lives.

Bits of a quantized weight = packed codes (rows padded to 32-bit words, see
:mod:`mpq.kernels.packing`) + scales at their dtype + packed zero-points (asymmetric formats,
one stream for the whole tensor). A ``:dq`` format stores instead of scales and zero-points,
per scale (and per min when asymmetric), one packed stream of ``rows * groups`` ``dq_bits``-bit
codes and ``rows * ceil(cols / 256)`` super-scales at the scale dtype (:mod:`mpq.quant.dq`). A kept
weight (16) is stored as float16. Every other tensor of
the model's state dict (norms, biases, BatchNorm statistics, excluded layers) is counted at its
own dtype; a tensor shared by several modules is counted once. The sum equals the bytes of the
quantized model's state dict, and of the tensors :mod:`mpq.export` writes (tests check both).

BOPs (bit operations) = sum over targets of MACs x weight bits x activation bits, with MACs
counted by hooks on one sample forward pass; unquantized activations count as 16 bits.

Latency is the fourth budget resource (:data:`RESOURCES`) but is measured, not counted here:
:mod:`mpq.latency` turns a measured table into the per-decision seconds a problem constrains.

Every conversion of a budget lives here: the user's text (:func:`parse_budget`), user units <->
limits on the decisions' summed costs (:func:`to_limit`, :func:`to_user`), the full-precision
ceiling (:func:`check_budget`), whether a plan's figures fit (:func:`over_budget`,
:func:`check_fit`) and the whole-model figures (:class:`CostReport`, :meth:`CostModel.fp_report`).

A container (an export format) states how it stores one target weight as a :class:`Storage`:
one function ``(shape, format) -> bytes``. :meth:`CostModel.in_container` swaps it in, so the
problem's ``bits``/``bytes`` columns, the budget checks and the reports all count the
container's real bytes; mpq's own packed layout is :data:`PACKED`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpq.errors import MpqError
from mpq.formats import (
    KEEP,
    KEEP_BITS,
    SCALE_DTYPES,
    WORD_BITS,
    QuantFormat,
    hi_cols,
    hi_rows,
    matrix_shape,
    n_groups,
    n_supers,
    words_per_row,
)
from mpq.plan import BitPlan
from mpq.targets import Target

if TYPE_CHECKING:
    import torch
    from torch import nn

# The budget arithmetic is torch-free; torch (and the model runner) are imported by the
# functions that read a model's tensors or run it.

RESOURCES = ("bits", "bytes", "bops", "latency")
"""Budget resources: ``bits`` (effective bits per target weight), ``bytes`` (the whole model),
``bops`` (bit operations of one sample forward pass), ``latency`` (seconds: the summed measured
latency of the target layers, from a ``mpq bench-layers`` table via
:func:`mpq.latency.load_latency_costs`; not a property of the stored bytes, so
:meth:`CostReport.resource` does not compute it)."""

TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
"""Units a ``latency=`` budget may be written in (``latency=2ms`` = ``latency=0.002``)."""


# Byte units of ``bytes=`` budgets: decimal (kB = 1000) and binary (KiB = 1024); case-insensitive.
BYTE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Other spellings of a resource name.
RESOURCE_ALIASES = {"avg-bits": "bits", "avg_bits": "bits", "avgbits": "bits"}
_NUMBER_UNIT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]+)\s*$")


def parse_budget(text: str) -> dict[str, float]:
    """``"4.0"`` (bits), ``"bits=3.5"``, ``"avg-bits=4"``, ``"bytes=80e6"``, ``"bytes=60MB"``,
    ``"60MiB"`` (a number with a byte unit is a bytes budget), ``"bits=4,bops=1e12"``,
    ``"latency=0.002"`` / ``"latency=2ms"`` / ``"2ms"`` (seconds of the target layers, measured by
    ``mpq bench-layers``; units ``s``, ``ms``, ``us``, ``ns``).

    Byte units: ``B``, ``kB``, ``MB``, ``GB``, ``TB`` (powers of 1000) and ``KiB``, ``MiB``,
    ``GiB``, ``TiB`` (powers of 1024), in any letter case; ``avg-bits`` is ``bits``.
    """
    out: dict[str, float] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.rpartition("=")
        key = key.strip().lower()
        key = RESOURCE_ALIASES.get(key, key)
        number, unit = value.strip(), ""
        m = _NUMBER_UNIT.match(value)
        if m and m.group(2).lower() not in ("inf", "nan", "infinity"):
            number, unit = m.group(1), m.group(2)
        if not key:
            key = "latency" if unit.lower() in TIME_UNITS else "bytes" if unit else "bits"
        if key not in RESOURCES:
            raise MpqError(
                f"budget {part!r}: unknown resource {key!r}; use one of {list(RESOURCES)} "
                f"(avg-bits is bits)"
            )
        scale: float = 1
        if unit:
            if key not in ("bytes", "latency"):
                raise MpqError(
                    f"budget {part!r}: the unit {unit!r} applies to byte and latency budgets "
                    f"only; write {key}=<number>, bytes=<number><unit> (e.g. bytes=60MB) or "
                    f"latency=<number><unit> (e.g. latency=2ms)"
                )
            units: Mapping[str, float] = BYTE_UNITS if key == "bytes" else TIME_UNITS
            if unit.lower() not in units:
                known = (
                    "B, kB, MB, GB, TB (x1000) or KiB, MiB, GiB, TiB (x1024)"
                    if key == "bytes"
                    else "s, ms, us, ns"
                )
                raise MpqError(f"budget {part!r}: unknown unit {unit!r}; use one of {known}")
            scale = units[unit.lower()]
        try:
            amount = float(number) * scale
        except ValueError:
            raise MpqError(
                f"budget {part!r}: {value!r} is not a number; write e.g. bits=4.0, "
                f"bytes=80e6 or bytes=60MB"
            ) from None
        if not math.isfinite(amount):
            raise MpqError(f"budget {part!r}: {value!r} is not a finite number")
        if key in out:
            raise MpqError(f"budget {text!r} gives {key} twice; give each resource once")
        out[key] = amount
    if not out:
        raise MpqError(f"budget {text!r} is empty; write e.g. 'bits=4.0' or 'bytes=80e6'")
    return out


def packed_stream_bits(streams: int, length: int, bits: int) -> int:
    """Bits of ``streams`` streams of ``length`` ``bits``-bit codes, each padded to 32-bit words."""
    return streams * words_per_row(length, bits) * WORD_BITS


def code_bits(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Bits of the packed codes of a quantized weight: one padded stream per output row."""
    rows, cols = matrix_shape(shape)
    return packed_stream_bits(rows, cols, fmt.bits)


def scale_bits(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Bits of the scales ``[rows, groups]`` of a quantized weight at the scale dtype; for a
    ``:dq`` format, its scale (and min) code streams and super-scales (super-mins)."""
    rows, cols = matrix_shape(shape)
    if fmt.dq_bits is not None:
        one = packed_stream_bits(1, rows * n_groups(cols, fmt), fmt.dq_bits)
        one += rows * n_supers(cols) * SCALE_DTYPES[fmt.scale_dtype]
        return one * (1 if fmt.symmetric else 2)
    return rows * n_groups(cols, fmt) * SCALE_DTYPES[fmt.scale_dtype]


def keep_bits(shape: tuple[int, ...]) -> int:
    """Bits of a weight kept as float16 (format ``16``)."""
    rows, cols = matrix_shape(shape)
    return rows * cols * KEEP_BITS


def weight_bits(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Exact stored bits of one weight of ``shape`` under ``fmt`` (codes + scales + zeros; a
    row-mixed format: each part's rows at its own format plus the packed 1-bit row mask; a
    column-mixed one: each part's ``[rows, columns]`` matrix plus the 1-bit column mask)."""
    if fmt.hi is not None and fmt.hi_axis == "cols":
        rows, cols = matrix_shape(shape)
        k = hi_cols(cols, fmt)
        low = weight_bits((rows, cols - k), fmt.low)
        return low + weight_bits((rows, k), fmt.hi) + packed_stream_bits(1, cols, 1)
    if fmt.hi is not None:
        rows, _ = matrix_shape(shape)
        k = hi_rows(rows, fmt)
        rest = tuple(shape[1:])
        low = weight_bits((rows - k, *rest), fmt.low) if k < rows else 0
        high = weight_bits((k, *rest), fmt.hi) if k else 0
        return low + high + packed_stream_bits(1, rows, 1)
    if fmt.keep:
        return keep_bits(shape)
    rows, cols = matrix_shape(shape)
    asym_int = not fmt.symmetric and fmt.dq_bits is None  # :dq stores mins, in scale_bits
    zeros = 0 if not asym_int else packed_stream_bits(1, rows * n_groups(cols, fmt), fmt.bits)
    return code_bits(shape, fmt) + scale_bits(shape, fmt) + zeros


def packed_bytes(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Bytes of one weight in mpq's packed layout (every part is whole 32-bit words or scales
    of whole bytes, so :func:`weight_bits` is a multiple of 8)."""
    return weight_bits(shape, fmt) // 8


WeightBytes = Callable[[tuple[int, ...], QuantFormat], int]
"""How a container stores one target weight: exact bytes per (shape, format)."""

Refusal = Callable[[tuple[int, ...], QuantFormat], "str | None"]
"""Why a container cannot store one (shape, format) weight, or None when it can."""


def _stores_all(shape: tuple[int, ...], fmt: QuantFormat) -> str | None:
    return None


@dataclass(frozen=True)
class Storage:
    """A container's storage of target weights: ``weight_bytes(shape, format)`` is the exact
    number of bytes it writes for one weight (codes, scales, zero-points and any per-tensor
    bookkeeping); every other tensor is stored at its dtype, as :class:`CostModel` counts it.
    ``refuses(shape, format)`` says why it cannot store a weight at all (None: it can); the
    problem builder then leaves that option out for that target."""

    name: str
    weight_bytes: WeightBytes
    refuses: Refusal = _stores_all


PACKED = Storage("mpq", packed_bytes)
"""mpq's own packed layout (the ``mpq`` and ``hf`` export folders, the packed model)."""


def tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def tensor_key(t: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
    """Identity of a tensor's memory (two views of the same bytes get the same key)."""
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict entries with tensors shared under several names kept once (first name)."""
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = tensor_key(t)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


@dataclass(frozen=True)
class CostReport:
    """What one plan costs on one model."""

    target_bits: int
    fixed_bits: int
    target_numel: int
    model_numel: int
    bops: int | None
    per_target_bits: Mapping[str, int]

    @property
    def total_bits(self) -> int:
        return self.target_bits + self.fixed_bits

    @property
    def total_bytes(self) -> int:
        return self.total_bits // 8

    @property
    def effective_bits(self) -> float:
        """Average stored bits per target weight, scales and zero-points included."""
        return self.target_bits / self.target_numel

    @property
    def model_bits(self) -> float:
        """Average stored bits per parameter of the whole model, everything included."""
        return self.total_bits / self.model_numel

    @property
    def target_bytes(self) -> int:
        return self.target_bits // 8

    def resource(self, name: str) -> float:
        if name == "bits":
            return self.effective_bits
        if name == "bytes":
            return float(self.total_bytes)
        if name == "bops":
            if self.bops is None:
                raise MpqError("BOPs need MACs: build the cost model with a sample input")
            return float(self.bops)
        if name == "latency":
            raise MpqError(
                "latency is measured, not computed from a plan's bytes: read it from a latency "
                "table (mpq.latency.load_latency_costs) and budget it through build_problem"
            )
        raise MpqError(f"unknown resource {name!r}; use one of {list(RESOURCES)}")

    def summary(self) -> dict[str, Any]:
        return {
            "effective_bits": self.effective_bits,
            "model_bits": self.model_bits,
            "total_bytes": self.total_bytes,
            "bops": self.bops,
        }


@dataclass(frozen=True)
class CostModel:
    """Everything the cost of a plan depends on, read once from a model."""

    model_id: str
    targets: tuple[Target, ...]
    fixed_bits: int
    fp_bits: int
    model_numel: int
    macs: Mapping[str, int] | None
    storage: Storage = PACKED

    @property
    def target_numel(self) -> int:
        return sum(t.numel for t in self.targets)

    @property
    def fixed_bytes(self) -> int:
        """Bytes of the non-target tensors, each at its dtype."""
        return self.fixed_bits // 8

    def in_container(self, storage: Storage) -> CostModel:
        """This cost model with target weights stored as ``storage`` says (same fixed tensors)."""
        return dataclasses.replace(self, storage=storage)

    def fp_report(self) -> CostReport:
        """The figures of the unquantized model: every tensor at its own dtype."""
        return CostReport(
            target_bits=self.fp_bits - self.fixed_bits,
            fixed_bits=self.fixed_bits,
            target_numel=self.target_numel,
            model_numel=self.model_numel,
            bops=None,
            per_target_bits={},
        )

    def target_cost(self, target: Target, fmt: QuantFormat) -> tuple[int, int | None]:
        """(stored bits, BOPs) of one target at one format, in this cost model's storage."""
        bits = self.storage.weight_bytes(target.shape, fmt) * 8
        if self.macs is None:
            return bits, None
        macs = self.macs[target.name]
        if fmt.hi is not None and fmt.hi_axis == "cols":  # ... of the input columns
            _, cols = matrix_shape(target.shape)
            k = hi_cols(cols, fmt)
            code = fmt.bits * (cols - k) + fmt.hi.bits * k
            return bits, macs * code * fmt.act_bits // cols
        if fmt.hi is not None:  # each part's share of the MACs is its share of the rows
            rows, _ = matrix_shape(target.shape)
            k = hi_rows(rows, fmt)
            code = fmt.bits * (rows - k) + fmt.hi.bits * k
            return bits, macs * code * fmt.act_bits // rows
        return bits, macs * fmt.bits * fmt.act_bits

    def plan_cost(self, plan: BitPlan) -> CostReport:
        per: dict[str, int] = {}
        bops: int | None = 0 if self.macs is not None else None
        for t in self.targets:
            if t.name not in plan.formats:
                raise MpqError(f"plan has no format for target {t.name!r}")
            bits, b = self.target_cost(t, plan.formats[t.name])
            per[t.name] = bits
            if bops is not None and b is not None:
                bops += b
        return CostReport(
            target_bits=sum(per.values()),
            fixed_bits=self.fixed_bits,
            target_numel=self.target_numel,
            model_numel=self.model_numel,
            bops=bops,
            per_target_bits=per,
        )


def count_macs(model: nn.Module, names: Iterable[str], sample: Any) -> dict[str, int]:
    """MACs of each named module (Linear, Conv2d; Embedding = 0) on one forward of ``sample``."""
    import torch
    from torch import nn

    from mpq.models import run_batch

    wanted = set(names)
    macs = {n: 0 for n in wanted}
    hooks = []

    def hook(name: str, module: nn.Module, out: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            macs[name] += out.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs[name] += out.numel() * (module.in_channels // module.groups) * k

    for name, module in model.named_modules():
        if name in wanted:
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: hook(name, m, o)))
    try:
        with torch.no_grad():
            run_batch(model, sample)
    finally:
        for h in hooks:
            h.remove()
    return macs


def target_tensor_keys(
    model: nn.Module, targets: Sequence[Target]
) -> set[tuple[int, tuple[int, ...], torch.dtype]]:
    """The :func:`tensor_key` of every target's weight (a tied weight appears once)."""
    import torch

    keys = set()
    modules = dict(model.named_modules())
    for t in targets:
        w = modules[t.name].weight
        assert isinstance(w, torch.Tensor)
        keys.add(tensor_key(w))
    return keys


def build_cost_model(
    model: nn.Module,
    targets: Sequence[Target],
    model_id: str,
    sample: Any = None,
) -> CostModel:
    """Read the fixed (non-target) tensors and, given a sample input, the MACs per target."""
    target_weights = target_tensor_keys(model, targets)
    state = unique_tensors(model.state_dict())
    fixed = 0
    numel = 0
    fp_bits = 0
    for tensor in state.values():
        numel += tensor.numel()
        fp_bits += tensor_bits(tensor)
        if tensor_key(tensor) not in target_weights:
            fixed += tensor_bits(tensor)
    macs = None
    if sample is not None:
        names = [n for t in targets for n in (t.name, *t.aliases)]
        raw = count_macs(model, names, sample)
        macs = {t.name: raw[t.name] + sum(raw[a] for a in t.aliases) for t in targets}
    return CostModel(
        model_id=model_id,
        targets=tuple(targets),
        fixed_bits=fixed,
        fp_bits=fp_bits,
        model_numel=numel,
        macs=macs,
    )


def to_limit(cost_model: CostModel, resource: str, value: float) -> float:
    """A budget in user units as a limit on the summed decision costs."""
    if resource == "bits":
        return value * cost_model.target_numel
    if resource == "bytes":
        return value - cost_model.fixed_bits / 8
    return value


def to_user(cost_model: CostModel, resource: str, amount: float) -> float:
    """Inverse of :func:`to_limit`."""
    if resource == "bits":
        return amount / cost_model.target_numel
    if resource == "bytes":
        return amount + cost_model.fixed_bits / 8
    return amount


def check_budget(cost_model: CostModel, budget: Mapping[str, float]) -> None:
    """Refuse a non-positive budget, or one above the full-precision ceiling (every target
    kept at 16 bits in the cost model's storage)."""
    keep = {t.name: KEEP for t in cost_model.targets}
    fp = cost_model.plan_cost(BitPlan(formats=keep, model_id=cost_model.model_id))
    for r, v in budget.items():
        if v <= 0:
            raise MpqError(f"budget {r}={v:g} must be positive")
        if r == "latency":
            continue  # measured, not a property of the plan's bytes: no full-precision ceiling
        ceiling = fp.resource(r)
        if v > ceiling * (1 + 1e-12):
            raise MpqError(
                f"budget {r}={v:g} is above full precision ({r}={ceiling:.6g} with every "
                f"target kept at 16 bits): nothing to allocate; use uniform:16 or a lower budget"
            )


def over_budget(report: CostReport, budget: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """``{resource: (figure, limit)}`` for every stored-size budget (bits, bytes, BOPs) the
    report exceeds; latency is measured, not a property of the stored bytes, so never here."""
    out: dict[str, tuple[float, float]] = {}
    if "bytes" in budget and report.total_bytes > budget["bytes"]:
        out["bytes"] = (float(report.total_bytes), float(budget["bytes"]))
    if "bits" in budget and report.effective_bits > budget["bits"] * (1 + 1e-12):
        out["bits"] = (report.effective_bits, float(budget["bits"]))
    if "bops" in budget and report.bops is not None and report.bops > budget["bops"]:
        out["bops"] = (float(report.bops), float(budget["bops"]))
    return out


def check_fit(what: str, report: CostReport, budget: Mapping[str, float]) -> None:
    """Raise :class:`MpqError` naming every budget ``report`` exceeds."""
    over = over_budget(report, budget)
    if over:
        parts = ", ".join(
            f"{r}: {s:,.6g} stored > {lim:,.6g} allowed" for r, (s, lim) in over.items()
        )
        raise MpqError(
            f"{what} do not fit the budget ({parts}); raise the budget, pass a cheaper plan or "
            f"let mpq export solve one (without --plan)"
        )


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state dict, each tensor's memory counted once."""
    return sum(tensor_bits(t) for t in unique_tensors(state).values()) // 8
