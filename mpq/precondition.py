"""Preconditioning: equivalence transforms of the fp model that change what quantization destroys.

A :class:`PreconditionSpec` (frozen, JSON-able: ``{"method": ..., "params": {...}}``) names one of

- ``none``: the model as it is (a copy).
- ``scale_folding`` (RAMP's Scale Folding, in SmoothQuant's form): per input channel ``j`` of a
  group of layers sharing one input, ``s_j = max|X_j|^alpha / max_i |W_i[:, j]|^(1 - alpha)``
  (max over calibration tokens and over every row of every layer of the group), the layers'
  weights become ``W diag(s)`` and the op that produces ``X`` divides its output by ``s`` (a
  norm's weight, or the rows of the previous Linear). RAMP's abstract gives the idea (migrate
  activation outliers into the weights by per-channel scaling, compensated in the normalization
  layer) but not the formula; this is SmoothQuant's, which it names.
- ``awq`` (AWQ's activation-aware scales): per group, ``s = mean|X_j|^a`` normalised by
  ``sqrt(max s * min s)``, ``a`` on the grid ``k / n_grid`` (``k = 0..n_grid-1``), keeping the
  ``a`` that minimises the group's output error ``sum_i ||Q_i(W_i diag(s)) diag(1/s) X^T -
  W_i X^T||^2`` with ``Q_i`` the RTN format of layer ``i`` (the spec's ``fmt``, or a per-layer
  override taken from a plan: :meth:`PreconditionSpec.for_plan`). The error is computed exactly
  from the input Gram ``H = X^T X`` (``tr(dW H dW^T)``), so calibration is one forward pass.
  ``a = 0`` is the identity, so on calibration data AWQ never does worse than plain RTN.
  Differences from the AWQ reference code: the error is measured on the group's Linear
  outputs, not on the whole attention / MLP module's output; there is no weight-clipping search;
  GPTQ formats are searched with RTN at the same bits.

Where the scales fold is data (:class:`FoldRule`), for LLaMA-style decoder blocks
(LLaMA / Mistral / Qwen2 / SmolLM naming):

========  =============================  ==============================================
group     folds ``1/s`` into             scales the input columns of
========  =============================  ==============================================
attn_in   ``input_layernorm`` weight     ``q_proj, k_proj, v_proj`` (one vector)
attn_out  ``v_proj`` output rows (+bias)  ``o_proj`` (grouped-query attention: see below)
mlp_in    ``post_attention_layernorm``   ``gate_proj, up_proj`` (one vector)
mlp_out   ``up_proj`` output rows (+bias) ``down_proj`` (its input ``act(gate) * up`` is
                                         linear in ``up``)
head      final ``model.norm`` weight    ``lm_head``, only when its weight is not shared
========  =============================  ==============================================

Grouped-query attention: ``o_proj``'s input channel ``h * head_dim + d`` carries value channel
``(h // n_rep) * head_dim + d``, so the ``o_proj`` scale is one vector over the ``kv_heads *
head_dim`` value channels, repeated over the ``n_rep`` query heads that read each kv head
(statistics are reduced over those heads: max for scale folding, mean for AWQ).
Row scaling of ``v_proj`` / ``up_proj`` does not change their own per-channel or group-wise
quantization (every row has its own scales), up to the rounding of the scales.

Every quantizable layer the rules do not cover is listed in the :class:`FoldReport` as
``not folded: <reason>`` (embeddings, a tied ``lm_head``, layers that are not targets), never
skipped silently. ``pow2=True`` rounds every scale to a power of two: the transform is then
exact in floating point (bit-identical fp outputs), at a coarser scale grid.

The transform is pure: the input model is never changed; a transformed deep copy is returned.
Shapes and dtypes do not change, so a cost model and the targets carry over unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.models import run_batch
from mpq.plan import BitPlan
from mpq.quant.quantize import fake_quantize
from mpq.targets import Target, module_kind
from mpq.tasks import CalibSpec, Task

METHODS = ("none", "scale_folding", "awq")
#: AWQ's search needs at least this many calibration tokens (rows of X): below it the
#: per-channel means and the Gram matrix are too noisy to pick scales (the AWQ paper uses 65k).
MIN_AWQ_TOKENS = 256
#: Scale folding reads per-channel maxima; it needs at least this many calibration tokens.
MIN_SF_TOKENS = 16
_NORM_NAMES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "RMSNorm")
_PARAMS = {
    "none": (),
    "scale_folding": ("alpha", "groups", "pow2"),
    "awq": ("fmt", "formats", "n_grid", "groups", "pow2"),
}
ALL_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "head")


# --------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class PreconditionSpec:
    """What to do, as data. ``fmt``/``formats`` are format spec strings (``"3:asym"``);
    ``formats`` holds per-layer overrides ``((layer name, spec), ...)`` for AWQ."""

    method: str = "none"
    alpha: float = 0.5
    fmt: str = "4:asym"
    formats: tuple[tuple[str, str], ...] = ()
    n_grid: int = 20
    groups: tuple[str, ...] = ALL_GROUPS
    pow2: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MpqError(f"precondition method {self.method!r} is unknown; use one of {METHODS}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise MpqError(f"alpha={self.alpha!r} must be a number in [0, 1]")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise MpqError(f"alpha={self.alpha} must be in [0, 1]")
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise MpqError(f"n_grid={self.n_grid!r} must be a positive integer (AWQ uses 20)")
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "formats", tuple((str(a), str(b)) for a, b in self.formats))
        bad = [g for g in self.groups if g not in ALL_GROUPS]
        if bad or not self.groups:
            raise MpqError(f"groups={list(self.groups)}: use a non-empty subset of {ALL_GROUPS}")
        QuantFormat.parse(self.fmt)
        for _, spec in self.formats:
            QuantFormat.parse(spec)

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in _PARAMS[self.method]:
            v = getattr(self, k)
            if k == "formats":
                v = dict(v)
            elif k == "groups":
                v = list(v)
            out[k] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params}

    @classmethod
    def from_dict(cls, obj: Any) -> PreconditionSpec:
        if not isinstance(obj, Mapping) or "method" not in obj:
            raise MpqError(
                f'precondition must be {{"method": ..., "params": {{...}}}}, got {obj!r}'
            )
        method = str(obj["method"])
        params = dict(obj.get("params") or {})
        if method not in METHODS:
            raise MpqError(f"precondition method {method!r} is unknown; use one of {METHODS}")
        unknown = set(params) - set(_PARAMS[method])
        if unknown:
            raise MpqError(
                f"precondition {method!r} has no parameters {sorted(unknown)}; "
                f"it takes {list(_PARAMS[method])}"
            )
        if "formats" in params:
            params["formats"] = tuple(sorted(dict(params["formats"]).items()))
        if "groups" in params:
            params["groups"] = tuple(params["groups"])
        return cls(method=method, **params)

    @classmethod
    def parse(cls, text: str) -> PreconditionSpec:
        """``none``, ``scale_folding``, ``scale_folding:alpha=0.5``, ``awq``,
        ``awq:fmt=3:asym,n_grid=20``, ``awq:pow2=true`` (comma-separated ``key=value``)."""
        method, _, rest = text.strip().partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise MpqError(f"precondition {text!r}: expected key=value, got {item!r}")
            key = key.strip()
            if key in ("alpha",):
                params[key] = _number(value, text)
            elif key == "n_grid":
                params[key] = int(_number(value, text))
            elif key == "pow2":
                params[key] = value.strip().lower() in ("1", "true", "yes")
            elif key == "groups":
                params[key] = value.strip().split("+")
            else:
                params[key] = value.strip()
        return cls.from_dict({"method": method, "params": params})

    def spec(self) -> str:
        """A short label (the inverse of :meth:`parse` for the common parameters)."""
        if self.method == "none":
            return "none"
        if self.method == "scale_folding":
            return f"scale_folding:alpha={self.alpha:g}"
        return f"awq:fmt={self.fmt}" + (f"+{len(self.formats)}overrides" if self.formats else "")

    def format_for(self, name: str) -> QuantFormat:
        """The format AWQ searches layer ``name`` at (an override, else ``fmt``)."""
        spec = dict(self.formats).get(name, self.fmt)
        f = QuantFormat.parse(spec)
        return dataclasses.replace(f, method="rtn") if f.method != "rtn" else f

    @classmethod
    def for_plan(cls, plan: BitPlan, **kwargs: Any) -> PreconditionSpec:
        """AWQ at the bits ``plan`` gives each layer."""
        formats = tuple((n, f.spec()) for n, f in plan.formats.items())
        return cls(method="awq", formats=formats, **kwargs)


def _number(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise MpqError(f"precondition {text!r}: {value!r} is not a number") from None


# --------------------------------------------------------------------------------------------
# Folding rules


@dataclass(frozen=True)
class FoldRule:
    """Layers ``layers`` (paths under a module whose name matches ``block``) share one input,
    produced by ``prev`` (a norm, or a Linear whose output rows feed that input)."""

    group: str
    block: str
    prev: str
    layers: tuple[str, ...]
    heads: bool = False  # prev is v_proj: tie the scale across the query heads of a kv head


_BLOCK = r"^(?:.*\.)?layers\.\d+$"
LLAMA_RULES: tuple[FoldRule, ...] = (
    FoldRule(
        "attn_in",
        _BLOCK,
        "input_layernorm",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    FoldRule("attn_out", _BLOCK, "self_attn.v_proj", ("self_attn.o_proj",), heads=True),
    FoldRule("mlp_in", _BLOCK, "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    FoldRule("mlp_out", _BLOCK, "mlp.up_proj", ("mlp.down_proj",)),
    FoldRule("head", r"^$", "model.norm", ("lm_head",)),
)
SUPPORTED = (
    "LLaMA-style decoder blocks `layers.<i>` with input_layernorm, self_attn.{q,k,v,o}_proj, "
    "post_attention_layernorm, mlp.{gate,up,down}_proj; norms: nn.LayerNorm, nn.RMSNorm, "
    + ", ".join(_NORM_NAMES[:-1])
)


@dataclass(frozen=True)
class FoldGroup:
    """One place a scale vector goes: the group, the op taking ``1/s``, the layers taking ``s``."""

    group: str
    prev: str
    layers: tuple[str, ...]
    n_rep: int = 1  # query heads per kv head (attn_out); the scale has len(in) / n_rep entries
    head_dim: int = 0


@dataclass(frozen=True)
class FoldedEntry:
    group: str
    prev: str
    layers: tuple[str, ...]
    exponent: float  # alpha (scale folding) or the chosen AWQ grid ratio
    scale_min: float
    scale_max: float
    error_before: float | None = None  # AWQ: output error at s = 1 (plain RTN)
    error_after: float | None = None


@dataclass(frozen=True)
class FoldReport:
    folded: tuple[FoldedEntry, ...]
    not_folded: tuple[tuple[str, str], ...]  # (layer, reason)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"{e.group}: {e.prev} -> {', '.join(e.layers)} (exponent {e.exponent:g}, "
            f"s in [{e.scale_min:.3g}, {e.scale_max:.3g}])"
            for e in self.folded
        ]
        return out + [f"{name}: not folded: {why}" for name, why in self.not_folded]

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [dataclasses.asdict(e) for e in self.folded],
            "not_folded": [list(x) for x in self.not_folded],
            "seconds": self.seconds,
        }


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return m.weight is not None
    name = type(m).__name__
    if "Gemma" in name:  # (1 + weight) * x: a scale does not fold into the weight alone
        return False
    w = getattr(m, "weight", None)
    return name in _NORM_NAMES and isinstance(w, nn.Parameter) and w.dim() == 1


def _shared_params(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), [])
            full = f"{name}.{pname}" if name else pname
            if full not in owners[id(p)]:
                owners[id(p)].append(full)
    return owners


def _heads(model: nn.Module, block: nn.Module) -> tuple[int, int]:
    """(n_rep, head_dim) of the attention in ``block``."""
    attn = block.get_submodule("self_attn")
    cfg = getattr(model, "config", None)
    head_dim = getattr(attn, "head_dim", None)
    n_rep = getattr(attn, "num_key_value_groups", None)
    if (head_dim is None or n_rep is None) and cfg is not None:
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        n_rep = n_heads // getattr(cfg, "num_key_value_heads", n_heads)
    if head_dim is None or n_rep is None:
        raise MpqError("cannot read the attention head layout (head_dim, kv groups) of the model")
    return int(n_rep), int(head_dim)


def plan_folds(
    model: nn.Module,
    targets: Sequence[Target] | None = None,
    groups: Sequence[str] = ALL_GROUPS,
    rules: Sequence[FoldRule] = LLAMA_RULES,
) -> tuple[list[FoldGroup], list[tuple[str, str]]]:
    """Where scales can fold in ``model`` (the rules that apply) and every quantizable layer
    they do not cover, with the reason. Raises :class:`MpqError` when no rule applies at all."""
    modules = dict(model.named_modules())
    shared = _shared_params(model)
    target_names = None if targets is None else {t.name for t in targets}
    found: list[FoldGroup] = []
    reasons: dict[str, str] = {}
    matched_any = False
    for rule in rules:
        for bname, block in modules.items():
            if not re.search(rule.block, bname):
                continue
            pre = f"{bname}." if bname else ""
            prev = modules.get(pre + rule.prev)
            layers = [modules.get(pre + p) for p in rule.layers]
            if prev is None or any(m is None for m in layers):
                continue
            if rule.group != "head":
                matched_any = True
            names = tuple(pre + p for p in rule.layers)
            why = _check(rule, prev, layers, pre + rule.prev, names, shared)
            if why is None and rule.group not in groups:
                why = f"group {rule.group!r} is not in this spec's groups"
            if why is None and target_names is not None:
                if not any(n in target_names for n in names):
                    why = "not a quantization target (stays in full precision)"
            if why is not None:
                for n in names:
                    reasons.setdefault(n, why)
                continue
            n_rep, head_dim = 1, 0
            if rule.heads:
                n_rep, head_dim = _heads(model, block)
            found.append(FoldGroup(rule.group, pre + rule.prev, names, n_rep, head_dim))
    if not matched_any:
        kinds = sorted({type(m).__name__ for m in modules.values() if not list(m.children())})
        raise MpqError(
            f"preconditioning cannot fold scales into this architecture: its layer kinds are "
            f"{kinds}, and no {SUPPORTED} were found; use precondition 'none'"
        )
    covered = {n for g in found for n in g.layers}
    not_folded: list[tuple[str, str]] = []
    for name, m in modules.items():
        kind = module_kind(m)
        if kind is None or name in covered:
            continue
        if name in reasons:
            why = reasons[name]
        elif kind == "embedding":
            why = "an embedding is a table lookup: it has no input activation to scale"
        else:
            why = "no fold rule covers it (its input is not produced by a norm or a Linear)"
        not_folded.append((name, why))
    return found, not_folded


def _check(
    rule: FoldRule,
    prev: nn.Module,
    layers: list[nn.Module | None],
    prev_name: str,
    names: tuple[str, ...],
    shared: dict[int, list[str]],
) -> str | None:
    for n, m in zip(names, layers, strict=True):
        if not isinstance(m, nn.Linear):
            return f"{n} is a {type(m).__name__}, not a Linear"
        owners = shared[id(m.weight)]
        if len(owners) > 1:
            others = [o for o in owners if o != f"{n}.weight"]
            return (
                f"its weight is shared with {others} (tied embeddings): scaling it by s would "
                f"change {others} too (folding 1/s into {prev_name} alone is fine for {n}, "
                f"but not for the tied tensor)"
            )
    ins = {m.in_features for m in layers if isinstance(m, nn.Linear)}
    if len(ins) != 1:
        return f"the layers {names} have different input widths {sorted(ins)}"
    (width,) = ins
    if isinstance(prev, nn.Linear):
        if rule.heads:
            if width % prev.out_features != 0:
                return f"{prev_name} has {prev.out_features} outputs for {width} inputs"
        elif prev.out_features != width:
            return f"{prev_name} has {prev.out_features} outputs, the layers read {width}"
        if len(shared[id(prev.weight)]) > 1:
            return f"{prev_name}'s weight is shared with other modules"
        return None
    if not _is_norm(prev):
        return (
            f"{prev_name} is a {type(prev).__name__}: scales fold only into a norm weight "
            f"(nn.LayerNorm, nn.RMSNorm, {', '.join(_NORM_NAMES[:-1])}) or a Linear"
        )
    w = prev.weight
    assert isinstance(w, torch.Tensor)
    if tuple(w.shape) != (width,):
        return f"{prev_name}'s weight has shape {list(w.shape)}, the layers read {width}"
    if len(shared[id(w)]) > 1:
        return f"{prev_name}'s weight is shared with other modules"
    return None


# --------------------------------------------------------------------------------------------
# Calibration statistics


@dataclass
class _Stats:
    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    tokens: int = 0


def collect_stats(
    model: nn.Module, folds: Sequence[FoldGroup], calib: Task | Iterable[Any], gram: bool
) -> dict[str, _Stats]:
    """Per fold group (keyed by its first layer): per-channel max|X|, sum|X|, token count and,
    with ``gram``, ``X^T X`` (float64), from one forward pass over ``calib``."""
    batches = calib.batches if isinstance(calib, Task) else calib
    stats = {g.layers[0]: _Stats() for g in folds}
    hooks = []

    def hook(key: str, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        s = stats[key]
        a = x.abs()
        amax, asum = a.amax(0), a.sum(0)
        s.absmax = amax if s.absmax is None else torch.maximum(s.absmax, amax)
        s.abssum = asum if s.abssum is None else s.abssum + asum
        if gram:
            h = x.T @ x
            s.gram = h if s.gram is None else s.gram + h
        s.tokens += x.shape[0]

    for key in stats:
        m = model.get_submodule(key)
        hooks.append(m.register_forward_pre_hook(lambda mod, inp, key=key: hook(key, inp)))
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return stats


# --------------------------------------------------------------------------------------------
# Scales


def _tie_heads(v: torch.Tensor, g: FoldGroup, how: str) -> torch.Tensor:
    """Reduce a per-input-channel vector of o_proj to the kv channels (``[kv * head_dim]``)."""
    if g.n_rep == 1:
        return v
    kv = v.numel() // (g.n_rep * g.head_dim)
    w = v.reshape(kv, g.n_rep, g.head_dim)
    return (w.amax(1) if how == "max" else w.mean(1)).reshape(-1)


def _expand_heads(s: torch.Tensor, g: FoldGroup) -> torch.Tensor:
    if g.n_rep == 1:
        return s
    kv = s.numel() // g.head_dim
    return s.reshape(kv, 1, g.head_dim).expand(kv, g.n_rep, g.head_dim).reshape(-1)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    w = model.get_submodule(name).weight
    assert isinstance(w, torch.Tensor)
    return w


def _pow2(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.round(torch.log2(s)))


def _finish(s: torch.Tensor, pow2: bool) -> torch.Tensor:
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)
    return _pow2(s) if pow2 else s


def _sf_scales(
    model: nn.Module, g: FoldGroup, st: _Stats, spec: PreconditionSpec
) -> tuple[torch.Tensor, FoldedEntry]:
    assert st.absmax is not None
    wmax = torch.stack([_weight(model, n).detach().abs().amax(0).double() for n in g.layers]).amax(
        0
    )
    xmax = _tie_heads(st.absmax, g, "max")
    wmax = _tie_heads(wmax, g, "max")
    a = float(spec.alpha)
    s = xmax.clamp_min(1e-5).pow(a) / wmax.clamp_min(1e-5).pow(1.0 - a)
    s = _finish(s, spec.pow2)
    entry = FoldedEntry(g.group, g.prev, g.layers, a, float(s.min()), float(s.max()))
    return s, entry


def _awq_error(
    ws: Sequence[torch.Tensor],
    fmts: Sequence[QuantFormat],
    s_in: torch.Tensor,
    gram: torch.Tensor,
) -> float:
    total = 0.0
    for w, f in zip(ws, fmts, strict=True):
        if f.keep:
            continue
        dw = fake_quantize(w * s_in, f) / s_in - w
        total += float(((dw @ gram) * dw).sum())
    return total


def _awq_scales(
    model: nn.Module, g: FoldGroup, st: _Stats, spec: PreconditionSpec
) -> tuple[torch.Tensor, FoldedEntry] | None:
    assert st.abssum is not None and st.gram is not None
    fmts = [spec.format_for(n) for n in g.layers]
    if all(f.keep for f in fmts):
        return None
    ws = [_weight(model, n).detach().float() for n in g.layers]
    gram = (st.gram / st.tokens).float()
    xmean = _tie_heads(st.abssum / st.tokens, g, "mean").float()
    best: tuple[float, float, torch.Tensor] | None = None
    base = _awq_error(ws, fmts, torch.ones(ws[0].shape[1]), gram)
    for k in range(spec.n_grid):
        ratio = k / spec.n_grid
        if k == 0:
            s, err = torch.ones_like(xmean), base
        else:
            s = xmean.clamp_min(1e-4).pow(ratio)
            s = _finish(s / (s.max() * s.min()).sqrt(), spec.pow2)
            err = _awq_error(ws, fmts, _expand_heads(s, g), gram)
        if best is None or err < best[0]:
            best = (err, ratio, s)
    assert best is not None
    err, ratio, s = best
    entry = FoldedEntry(g.group, g.prev, g.layers, ratio, float(s.min()), float(s.max()), base, err)
    return s.double(), entry


def _fold(model: nn.Module, g: FoldGroup, s_prev: torch.Tensor) -> None:
    """``prev`` output / s, the layers' input columns * s (s given over prev's outputs)."""
    prev = model.get_submodule(g.prev)
    s_in = _expand_heads(s_prev, g)
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            w = prev.weight
            w.copy_((w.double() / s_prev[:, None]).to(w.dtype))
            if prev.bias is not None:
                prev.bias.copy_((prev.bias.double() / s_prev).to(prev.bias.dtype))
        else:
            nw = _weight(model, g.prev)
            nw.copy_((nw.double() / s_prev).to(nw.dtype))
            b = getattr(prev, "bias", None)
            if isinstance(b, torch.Tensor):
                b.copy_((b.double() / s_prev).to(b.dtype))
        for n in g.layers:
            lw = _weight(model, n)
            lw.copy_((lw.double() * s_in[None, :]).to(lw.dtype))


# --------------------------------------------------------------------------------------------
# The transform


RECORD_VERSION = 1


@dataclass(frozen=True)
class PreconditionRecord:
    """What a transform did to the fp model, as every plan solved from it carries it in
    ``meta["precondition"]`` (:meth:`to_dict`; :meth:`from_dict` reads it back and refuses other
    versions). ``calib``: the data it was fitted on (tokens, data id, split, task key);
    ``scales_sha256``: a digest of the scales it folded (a refit must reproduce it);
    ``not_folded``: (layer, reason) pairs; ``calib_args``: the :class:`CalibSpec` to refit it
    (:func:`prepared_for_plan`); ``seconds``: its calibration cost (comparisons report it);
    ``report``: the fold report of the ``none`` transform."""

    spec: PreconditionSpec = field(default_factory=lambda: PreconditionSpec())
    calib: Mapping[str, Any] | None = None
    scales_sha256: str | None = None
    not_folded: tuple[tuple[str, str], ...] | None = None
    report: Mapping[str, Any] | None = None
    calib_args: CalibSpec | None = None
    seconds: float | None = None

    @property
    def method(self) -> str:
        return self.spec.method

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the record (the keys that are set, and ``version``)."""
        out: dict[str, Any] = self.spec.to_dict()
        if self.report is not None:
            out["report"] = self.report
        if self.calib is not None:
            out["calib"] = dict(self.calib)
        if self.scales_sha256 is not None:
            out["scales_sha256"] = self.scales_sha256
        if self.not_folded is not None:
            out["not_folded"] = [list(x) for x in self.not_folded]
        if self.calib_args is not None:
            out["calib_args"] = dataclasses.asdict(self.calib_args)
        if self.seconds is not None:
            out["seconds"] = self.seconds
        out["version"] = RECORD_VERSION
        return json.loads(json.dumps(out))

    def tag(self) -> str:
        """A digest of what the transform computed (spec, data, scales): names the model."""
        body = {k: v for k, v in self.to_dict().items() if k not in _UNTAGGED}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]

    @classmethod
    def from_dict(cls, obj: Any) -> PreconditionRecord:
        """Read a record written by :meth:`to_dict` (a record without ``version`` is a plan
        from before versioning, with the same layout)."""
        spec = PreconditionSpec.from_dict(obj)
        version = obj.get("version", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise MpqError(
                f"the plan's precondition record has version {version!r}; this mpq reads "
                f"version {RECORD_VERSION}: solve the plan again with this mpq"
            )
        args = obj.get("calib_args")
        if args is not None and not isinstance(args, Mapping):
            raise MpqError(f"the plan's precondition calib_args {args!r} is not an object")
        try:
            calib_args = CalibSpec(**args) if args is not None else None
        except TypeError as exc:
            raise MpqError(f"the plan's precondition calib_args are malformed ({exc})") from None
        raw = obj.get("not_folded")
        not_folded = None if raw is None else tuple((str(a), str(b)) for a, b in raw)
        return cls(
            spec=spec,
            calib=obj.get("calib"),
            scales_sha256=obj.get("scales_sha256"),
            not_folded=not_folded,
            report=obj.get("report"),
            calib_args=calib_args,
            seconds=obj.get("seconds"),
        )


# Keys that do not change what the transform computed (left out of the model's tag).
_UNTAGGED = ("not_folded", "version", "calib_args", "seconds")


@dataclass(frozen=True)
class Preconditioned:
    """The transformed copy, what was folded where, and the record for a plan's meta."""

    model: nn.Module
    spec: PreconditionSpec
    report: FoldReport
    record: PreconditionRecord = field(default_factory=PreconditionRecord)


def _calib_info(calib: Any, tokens: int) -> dict[str, Any]:
    info: dict[str, Any] = {"tokens": tokens}
    for attr in ("data_id", "split", "key"):
        if hasattr(calib, attr):
            info[attr] = getattr(calib, attr)
    return info


def precondition_model(
    model: nn.Module,
    spec: PreconditionSpec,
    calib: Task | Iterable[Any] | None = None,
    targets: Sequence[Target] | None = None,
) -> Preconditioned:
    """A transformed deep copy of ``model`` (``model`` is untouched) with ``spec`` applied.

    ``calib`` (a :class:`mpq.tasks.Task` or batches of model inputs) is needed by
    ``scale_folding`` (at least ``MIN_SF_TOKENS`` tokens) and ``awq`` (at least
    ``MIN_AWQ_TOKENS``). ``targets`` limits folding to groups holding a target; layers left out
    are reported. Raises :class:`MpqError` for an architecture with nowhere to fold.
    """
    t0 = time.perf_counter()
    out = copy.deepcopy(model)
    if spec.method == "none":
        report = FoldReport((), (), time.perf_counter() - t0)
        record = PreconditionRecord(spec, report=json.loads(json.dumps(report.to_dict())))
        return Preconditioned(out, spec, report, record)
    folds, not_folded = plan_folds(model, targets, spec.groups)
    if calib is None:
        raise MpqError(
            f"precondition {spec.method!r} needs calibration data (a Task or batches of inputs)"
        )
    stats = collect_stats(model, folds, calib, gram=spec.method == "awq")
    tokens = min((s.tokens for s in stats.values()), default=0)
    need = MIN_AWQ_TOKENS if spec.method == "awq" else MIN_SF_TOKENS
    if tokens < need:
        raise MpqError(
            f"precondition {spec.method!r} got {tokens} calibration tokens; it needs at least "
            f"{need} (e.g. 1 window of {need} tokens): give more calibration windows"
        )
    folded: list[FoldedEntry] = []
    digest = hashlib.sha256()
    for g in folds:
        st = stats[g.layers[0]]
        if spec.method == "scale_folding":
            s, entry = _sf_scales(out, g, st, spec)
        else:
            res = _awq_scales(out, g, st, spec)
            if res is None:
                for n in g.layers:
                    not_folded.append((n, "every layer of its group is kept at 16 bits"))
                continue
            s, entry = res
        _fold(out, g, s)
        folded.append(entry)
        digest.update(s.float().numpy().tobytes())
    report = FoldReport(tuple(folded), tuple(not_folded), time.perf_counter() - t0)
    record = PreconditionRecord(
        spec,
        calib=json.loads(json.dumps(_calib_info(calib, tokens))),
        scales_sha256=digest.hexdigest()[:16],
        not_folded=tuple((str(a), str(b)) for a, b in not_folded),
    )
    return Preconditioned(out, spec, report, record)


def record_of(plan: BitPlan) -> PreconditionRecord:
    """The record in ``plan.meta["precondition"]`` (the ``none`` record when absent)."""
    rec = plan.meta.get("precondition")
    if rec is None:
        return PreconditionRecord()
    return PreconditionRecord.from_dict(rec)


def spec_from_plan(plan: BitPlan) -> PreconditionSpec:
    """The spec recorded in ``plan.meta["precondition"]`` (``none`` when absent)."""
    return record_of(plan).spec
