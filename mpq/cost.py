"""The exact cost model: the only place where budget arithmetic lives.

Bits of a quantized weight = packed codes (rows padded to 32-bit words, see
:mod:`mpq.kernels.packing`) + scales at their dtype + packed zero-points (asymmetric formats,
one stream for the whole tensor). A kept weight (16) is stored as float16. Every other tensor of
the model's state dict (norms, biases, BatchNorm statistics, excluded layers) is counted at its
own dtype; a tensor shared by several modules is counted once. The sum equals the bytes of the
quantized model's state dict, and of the tensors :mod:`mpq.export` writes (tests check both).

BOPs (bit operations) = sum over targets of MACs x weight bits x activation bits, with MACs
counted by hooks on one sample forward pass; unquantized activations count as 16 bits.

Latency is the fourth budget resource (:data:`RESOURCES`) but is measured, not counted here:
:mod:`mpq.latency` turns a measured table into the per-decision seconds a problem constrains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.formats import KEEP_BITS, SCALE_DTYPES, QuantFormat
from mpq.kernels.packing import WORD_BITS, words_per_row
from mpq.models import run_batch
from mpq.plan import BitPlan
from mpq.quantize import matrix_shape, n_groups
from mpq.targets import Target

RESOURCES = ("bits", "bytes", "bops", "latency")
"""Budget resources: ``bits`` (effective bits per target weight), ``bytes`` (the whole model),
``bops`` (bit operations of one sample forward pass), ``latency`` (seconds: the summed measured
latency of the target layers, from a ``mpq bench-layers`` table via
:func:`mpq.latency.load_latency_costs`; not a property of the stored bytes, so
:meth:`CostReport.resource` does not compute it)."""

TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
"""Units a ``latency=`` budget may be written in (``latency=2ms`` = ``latency=0.002``)."""


def weight_bits(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Exact stored bits of one weight of ``shape`` under ``fmt`` (codes + scales + zeros)."""
    rows, cols = matrix_shape(shape)
    if fmt.keep:
        return rows * cols * KEEP_BITS
    groups = n_groups(cols, fmt)
    codes = rows * words_per_row(cols, fmt.bits) * WORD_BITS
    scales = rows * groups * SCALE_DTYPES[fmt.scale_dtype]
    zeros = 0 if fmt.symmetric else words_per_row(rows * groups, fmt.bits) * WORD_BITS
    return codes + scales + zeros


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

    @property
    def target_numel(self) -> int:
        return sum(t.numel for t in self.targets)

    def target_cost(self, target: Target, fmt: QuantFormat) -> tuple[int, int | None]:
        """(stored bits, BOPs) of one target at one format."""
        bits = weight_bits(target.shape, fmt)
        if self.macs is None:
            return bits, None
        w_bits = fmt.bits
        return bits, self.macs[target.name] * w_bits * fmt.act_bits

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
