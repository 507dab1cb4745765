"""The estimator interface: what an estimator declares and computes, and how that becomes a table.

An estimator is a frozen dataclass whose fields are its parameters. Class attributes declare
what it needs (``requires_data``, ``requires_grad``, ``requires_hvp``), which target kinds it
supports, and how the runner (:func:`mpq.sensitivity.runner.run_estimator`) schedules it:

- ``group_size()``: how many targets one :meth:`~Estimator.compute` call receives: ``1`` for
  per-target estimators (a killed run loses at most the target in progress), ``None`` for
  estimators that compute every missing target in one pass (Hutchinson: one full-model
  Hessian-vector product per sample serves every layer). Either way results are cached per
  target.
- ``per_format``: results depend on the candidate formats (Taylor, correlation, measured), so
  the formats are part of the cache key; score-only estimators are cached without them.
- ``needs_all_targets``: a target's result depends on the whole target set (GWQ's model-wide
  outlier threshold), so the set is part of the key and a missing target recomputes all.
- ``view_params``: parameters that only choose which cached quantity the table reports (e.g.
  ``metric="kl"`` or ``"loss"`` of measured damage); they are not part of the cache key.

**The distortion model.** Every estimator fills ``distortion(target, format)`` for every
candidate format that fits the target, so any estimator feeds any solver:

- per-format estimators measure it directly from each format's actual ``dW = Q(W) - W``;
- score-only estimators use HAWQ-V2's form ``c_l * ||Q_fmt(W_l) - W_l||^2`` where the
  coefficient ``c_l`` (:meth:`EstimatorBase.coefficient`) turns the layer's score into a
  predicted loss increase per unit of squared weight error: ``1/2 tr(H_l)/n_l`` for a Hessian
  trace (the expected second-order loss change for an isotropic ``dW``), ``1/2 |lambda_max|``
  for the top eigenvalue (a bound), ``1/2 sum(F_l)/n_l`` for the Fisher, ... Negative
  curvature predicts no damage and is clamped at 0 (solvers need non-negative distortions).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from mpq.errors import MpqError
from mpq.evaluate import Reference, reference
from mpq.formats import QuantFormat
from mpq.formats import fits as _fits
from mpq.layerstats import InputStats
from mpq.quant.quantize import QuantizedTensor, dequantize, fake_quantize, quant_error, quantize
from mpq.quantstore import QuantStore
from mpq.sensitivity.loss import Calibration
from mpq.targets import Target
from mpq.tasks import Task

T = TypeVar("T")

ALL_KINDS: frozenset[str] = frozenset({"linear", "conv2d", "embedding"})
MATMUL_KINDS: frozenset[str] = frozenset({"linear", "conv2d"})


def _finite_map(obj: Any, what: str) -> dict[str, float]:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is not an object")
    out: dict[str, float] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what}[{k!r}] is not a number")
        if not math.isfinite(v):
            raise ValueError(f"{what}[{k!r}] is not finite")
        out[k] = float(v)
    return out


@dataclass(frozen=True)
class TargetResult:
    """What an estimator found for one target (the unit of caching).

    ``values``: named per-target quantities (``"score"`` is the estimator's default score);
    ``stderr``: standard errors of some of them; ``distortions``: for per-format estimators,
    ``{metric: {format spec: value}}``.
    """

    values: Mapping[str, float]
    stderr: Mapping[str, float] = field(default_factory=dict)
    distortions: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _finite_map(dict(self.values), "values")
        _finite_map(dict(self.stderr), "stderr")
        for k, row in self.distortions.items():
            _finite_map(dict(row), f"distortions[{k!r}]")

    def to_json(self) -> dict[str, Any]:
        return {
            "values": dict(self.values),
            "stderr": dict(self.stderr),
            "distortions": {k: dict(v) for k, v in self.distortions.items()},
        }

    @classmethod
    def from_json(cls, obj: Any) -> TargetResult:
        """Parse a cache entry; ``ValueError`` on missing or wrong fields or non-finite values."""
        if not isinstance(obj, dict) or set(obj) != {"values", "stderr", "distortions"}:
            raise ValueError("expected exactly the fields values, stderr, distortions")
        dist = obj["distortions"]
        if not isinstance(dist, dict):
            raise ValueError("distortions is not an object")
        return cls(
            values=_finite_map(obj["values"], "values"),
            stderr=_finite_map(obj["stderr"], "stderr"),
            distortions={str(k): _finite_map(v, f"distortions[{k!r}]") for k, v in dist.items()},
        )


@dataclass
class Context:
    """Everything an estimator's ``compute`` may use: the model, calibration data, formats."""

    model: nn.Module
    task: Task
    calib: Calibration
    formats: tuple[QuantFormat, ...] = ()
    progress: bool = False
    _reference: Reference | None = None
    #: what an estimator computes once per run and reuses across its ``compute`` calls (measured
    #: damage keeps the fp model's cached block inputs here); dropped with the context
    memo: dict[str, Any] = field(default_factory=dict)
    #: per-target input statistics of the calibration task (importance / Hessian) for formats
    #: whose method uses them (mse, gptq); only the measured estimator scores such formats
    stats: Mapping[str, InputStats] = field(default_factory=dict)
    #: quantized weights kept on disk for the evaluator and later runs (the measured estimator
    #: reads and fills it through :meth:`QuantStore.view`); None: per-target memos only
    quant_store: QuantStore | None = None

    def quantized(
        self,
        target: Target,
        weight: torch.Tensor,
        fmt: QuantFormat,
        parts: MutableMapping[str, QuantizedTensor] | None = None,
    ) -> torch.Tensor:
        """``weight`` as ``fmt`` stores it for ``target`` (statistics applied by method;
        ``parts``: the caller's memo of a row-mixed format's whole-weight parts, by spec)."""
        st = self.stats.get(target.name)
        if (fmt.hi is not None or parts is not None) and not fmt.keep and fmt.method != "gptq":
            imp = st.diag if st is not None and fmt.method == "mse" else None
            memo = {} if parts is None else parts

            def part(f: QuantFormat) -> QuantizedTensor:
                if f.spec() not in memo:
                    memo[f.spec()] = quantize(weight, f, importance=imp, part=part)
                return memo[f.spec()]

            return dequantize(part(fmt)).to(weight.dtype)
        if fmt.method == "gptq" and not fmt.keep:
            if st is None or st.full is None:
                raise MpqError(f"{target.name}: {fmt.spec()} needs the layer's input Hessian")
            return fake_quantize(weight, fmt, hessian=st.full)
        importance = st.diag if st is not None and fmt.method == "mse" else None
        return fake_quantize(weight, fmt, importance=importance)

    def weight(self, target: Target) -> torch.Tensor:
        w = getattr(self.model.get_submodule(target.name), "weight", None)
        if not isinstance(w, torch.Tensor):
            raise MpqError(f"target {target.name!r} has no weight tensor")
        return w

    def module(self, target: Target) -> nn.Module:
        return self.model.get_submodule(target.name)

    def reference(self) -> Reference:
        """The fp model's log-probabilities on the calibration batches (computed once)."""
        if self._reference is None:
            self._reference = reference(self.task, self.model)
        return self._reference

    def fitting_formats(self, target: Target) -> list[QuantFormat]:
        return [f for f in self.formats if fits(target, f)]

    def bar(self, it: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
        return tqdm(it, desc=desc, total=total, disable=not self.progress, leave=False)


def fits(target: Target, fmt: QuantFormat) -> bool:
    """``fmt`` can store ``target`` (GPTQ runs on Linear layers only)."""
    if fmt.method == "gptq" and not fmt.keep and target.kind != "linear":
        return False
    return _fits(target.shape, fmt)


class EstimatorBase:
    """The estimator interface with its defaults (see the module docstring); every estimator
    subclasses it as a frozen dataclass."""

    name: ClassVar[str] = ""
    requires_data: ClassVar[bool] = True
    requires_grad: ClassVar[bool] = False
    requires_hvp: ClassVar[bool] = False
    kinds: ClassVar[frozenset[str]] = ALL_KINDS
    per_format: ClassVar[bool] = False
    needs_all_targets: ClassVar[bool] = False
    view_params: ClassVar[tuple[str, ...]] = ()
    #: the metric of ``TargetResult.distortions`` a per-format estimator reports by default
    distortion_metric: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def key_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.params().items() if k not in self.view_params}

    def label(self) -> str:
        return self.name

    def group_size(self) -> int | None:
        return 1

    def uses_input_stats(self) -> bool:
        """Whether ``compute`` reads the targets' input statistics (``ctx.stats``) whatever the
        formats' methods (the runner collects them, full matrices included)."""
        return False

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        raise NotImplementedError

    def score(self, result: TargetResult, target: Target) -> float:
        return float(result.values["score"])

    def score_stderr(self, result: TargetResult, target: Target) -> float | None:
        v = result.stderr.get("score")
        return None if v is None else float(v)

    def distortion_stderr(
        self, result: TargetResult, target: Target, formats: Sequence[QuantFormat]
    ) -> dict[str, float]:
        """Standard error of each format's distortion, where the estimator measures one (the
        noise floor: two distortions closer than a few of these are not ordered)."""
        row = result.distortions.get(f"{self.distortion_row()}_se", {})
        return {f.spec(): float(row[f.spec()]) for f in formats if f.spec() in row}

    def coefficient(self, result: TargetResult, target: Target) -> float:
        """Predicted loss increase per unit of ``||dW||^2`` (score-only estimators)."""
        return max(self.score(result, target), 0.0)

    def distortion_row(self) -> str:
        """Which per-format distortion row the table reports (per-format estimators)."""
        return self.distortion_metric

    def distortions(
        self,
        result: TargetResult,
        target: Target,
        weight: torch.Tensor,
        formats: Sequence[QuantFormat],
    ) -> dict[str, float]:
        usable = [f for f in formats if not f.keep and fits(target, f)]
        if self.per_format:
            row = result.distortions.get(self.distortion_row(), {})
            return {f.spec(): max(row[f.spec()], 0.0) for f in usable if f.spec() in row}
        c = self.coefficient(result, target)
        return {f.spec(): c * quant_error(weight, f) for f in usable}


def choice(value: str, options: Sequence[str], what: str) -> None:
    """Refuse a parameter value outside ``options``."""
    if value not in options:
        raise MpqError(f"{what}={value!r} is unknown; use one of {list(options)}")


def positive(value: float, what: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MpqError(f"{what}={value!r} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise MpqError(f"{what}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


#: The type every estimator has (one interface: :class:`EstimatorBase`).
Estimator = EstimatorBase
