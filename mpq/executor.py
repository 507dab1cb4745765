"""`apply_plan`: put a bit plan onto a real model.

``mode="packed"`` replaces every target with a module that stores packed integer codes, scales
and zero-points (:mod:`mpq.kernels.modules`) and runs its matmul on an explicit kernel
``backend`` (``reference``, ``cpu``, ``triton``, ``cupy`` or ``auto``; see
:mod:`mpq.kernels.backends`): what gets deployed, with exactly the bytes the cost model counts.
``mode="fake"`` overwrites each target's float weight with its dequantized value: the same
outputs within float tolerance, at full speed, for search loops. The executor never decides
bits; it applies what the plan says.

Formats whose method uses input statistics (``mse``: the importance ``mean(x^2)`` per input
column; ``gptq``: ``H = mean(x x^T)``) take them from ``stats=`` (see :mod:`mpq.layerstats`,
which also caches them on disk: one pass of the full-precision model) or from calibration
inputs (``calib=``). With ``calib=`` and any ``gptq`` format, the targets inside the model's
blocks are quantized *sequentially* as in the GPTQ paper (:mod:`mpq.sequential`,
``GPTQConfig.sequential``): each layer's statistics come from the calibration inputs run
through the model whose earlier layers are already quantized; otherwise one pass of the
unquantized model. GPTQ applies to Linear targets.
Formats with ``act_bits < 16`` fake-quantize the layer input in both modes
(:mod:`mpq.quant.act_quant`; fake mode uses a forward pre-hook).

:func:`load_packed` rebuilds a packed model from a state dict or a file written by
:func:`mpq.export.safetensors.save_packed`, refusing tensors whose names, shapes, dtypes or
padding bits do not match the plan.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.formats import DATA_METHODS, KEEP_BITS, QuantFormat
from mpq.kernels import backends as B
from mpq.kernels.modules import (
    ColMixLinear,
    PackedWeight,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    RowMixLinear,
)
from mpq.layerstats import InputStats, collect_input_stats, weighted_by_input
from mpq.plan import BitPlan
from mpq.quant.act_quant import DEFAULT_ACT_QUANT, ActQuant, apply_act_quant
from mpq.quant.core import QuantizedTensor
from mpq.quant.gptq import GPTQConfig, gptq_quantize
from mpq.quant.quantize import dequantize, quantize
from mpq.sequential import Need, block_index, find_blocks, run_sequential
from mpq.targets import Target

log = logging.getLogger("mpq.executor")
Mode = Literal["packed", "fake"]
QUANT_MODULES = (QuantLinear, QuantConv2d, QuantEmbedding, RowMixLinear)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def _packed_module(
    module: nn.Module, packed: PackedWeight, name: str, backend: str, act: ActQuant
) -> nn.Module:
    if isinstance(module, nn.Linear):
        return QuantLinear(packed, module.bias, backend=backend, act=act, name=name)
    B.check_layer(backend, name, _kind(module), packed.rows, packed.cols, packed.fmt)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(packed, module, act=act)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(packed, module)
    raise MpqError(
        f"cannot quantize a {type(module).__name__}; targets are Linear/Conv2d/Embedding"
    )


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return type(module).__name__


def collect_hessians(
    model: nn.Module, names: Sequence[str], calib: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """``H = mean over input rows of x x^T`` (float64) of the Linear modules ``names``, from one
    forward pass per calibration batch (:func:`mpq.layerstats.collect_input_stats`)."""
    stats = collect_input_stats(model, names, calib, full=names)
    return {n: st.full for n, st in stats.items() if st.full is not None}


def data_targets(plan: BitPlan, targets: Sequence[Target]) -> tuple[list[str], list[str]]:
    """(Targets whose format's method uses input statistics (mse, gptq): Linear layers and tied
    embeddings, weighted by their head's input (:func:`mpq.layerstats.weighted_by_input`);
    those of them that need the full second moment (gptq))."""
    names, full = [], []
    for t in targets:
        fmt = plan.formats[t.name]
        if fmt.keep or fmt.method not in DATA_METHODS or not weighted_by_input(t):
            continue
        names.append(t.name)
        if fmt.method == "gptq":
            full.append(t.name)
    return names, full


def _act_pre_hook(bits: int, cfg: ActQuant, channel_dim: int) -> Any:
    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return (apply_act_quant(inputs[0], bits, cfg, channel_dim), *inputs[1:])

    return hook


def apply_plan(
    model: nn.Module,
    plan: BitPlan,
    targets: Sequence[Target],
    *,
    mode: Mode = "packed",
    inplace: bool = False,
    backend: str = "reference",
    calib: Iterable[Any] | None = None,
    gptq: GPTQConfig | None = None,
    act: ActQuant = DEFAULT_ACT_QUANT,
    stats: Mapping[str, InputStats] | None = None,
    memo: MutableMapping[tuple[str, str], QuantizedTensor | None] | None = None,
) -> nn.Module:
    """The model with ``plan`` applied (a copy unless ``inplace``).

        ``backend`` picks the kernels of packed Linear layers (``mpq.executor.backends(model)``
        reports what each layer got); ``act`` sets how ``act_bits`` quantize layer inputs.
        Formats whose method uses input statistics: ``stats`` (per target, e.g. from
        :func:`mpq.layerstats.cached_input_stats`) or else ``calib`` (batches run through the
        unquantized model once) supply them. ``mse`` uses the importance (``diag``) when either is
        given and the plain squared error otherwise (and on targets without statistics: a tied
    embedding is weighted by its head's input, :mod:`mpq.layerstats`); ``gptq`` needs the
        full second moment and refuses to run without; ``gptq=`` sets its options.
        ``memo`` (fake mode): quantized weights by (target, format spec), read and filled, so plans
        applied one after another to the same model with the same ``stats`` quantize each (target,
        format) once (a search measures hundreds of plans that differ in a few layers); the caller
        keeps one memo per (model, statistics). GPTQ formats are never memoized (their result
        depends on the rest of the plan when run sequentially).
    """
    if mode not in ("packed", "fake"):
        raise MpqError(f"mode={mode!r} is unknown; use 'packed' or 'fake'")
    if memo is not None and mode != "fake":
        raise MpqError("apply_plan(memo=...) applies to mode='fake' (packed modules own codes)")
    B.check_request(backend)
    if mode == "fake" and backend != "reference":
        raise MpqError(
            f"backend={backend!r} applies to mode='packed'; fake mode keeps float modules"
        )
    plan.validate(targets)
    gptq_targets = [t for t in targets if plan.formats[t.name].method == "gptq"]
    gptq_targets = [t for t in gptq_targets if not plan.formats[t.name].keep]
    for t in gptq_targets:
        if t.kind != "linear":
            raise MpqError(
                f"{t.name}: GPTQ applies to Linear layers, this target is a {t.kind}; "
                f"give it an rtn or mse format"
            )
    names, full = data_targets(plan, targets)
    cfg = gptq or GPTQConfig()
    have = dict(stats or {})
    lacking_full = [n for n in full if n not in have or have[n].full is None]
    if lacking_full and calib is None:
        raise MpqError(
            f"plan uses GPTQ for {len(full)} target(s) ({lacking_full[:3]}) but no calibration "
            f"data was given: pass apply_plan(..., calib=batches) or stats=, or use rtn formats"
        )
    out = model if inplace else copy.deepcopy(model)
    qts: dict[str, QuantizedTensor | None] = {}
    if calib is not None and full and cfg.sequential != "off":
        if stats:
            raise MpqError(
                "apply_plan got both stats= and calib= for a GPTQ plan: calib= runs GPTQ "
                "sequentially (statistics from the partly quantized model), stats= gives "
                "full-precision statistics; pass one, or GPTQConfig(sequential='off')"
            )
        reason = _apply_sequential(out, plan, targets, calib, cfg, act, qts)
        if reason is not None:
            log.warning("GPTQ uses full-precision statistics: %s", reason)
    if calib is not None:
        todo = [
            n
            for n in names
            if n not in qts and (n not in have or (n in full and have[n].full is None))
        ]
        if todo:
            have.update(
                collect_input_stats(model, todo, calib, full=[n for n in todo if n in full])
            )
    with torch.no_grad():
        for t in targets:
            fmt = plan.formats[t.name]
            if t.name not in qts:
                key = (t.name, fmt.spec())
                cache = memo if memo is not None and fmt.method != "gptq" else {}
                if key not in cache:
                    w = _weight(out.get_submodule(t.name))
                    st = have.get(t.name)
                    cache[key] = (
                        _quantize_one(w, fmt, st, cfg, cache=cache, name=t.name)
                        if fmt.hi is not None  # its two parts are memoized too
                        else _quantize_one(w, fmt, st, cfg)
                    )
                qts[t.name] = cache[key]
            _install(out, t, fmt, qts[t.name], mode, backend, act)
    return out


def _quantize_one(
    w: torch.Tensor,
    fmt: QuantFormat,
    st: InputStats | None,
    cfg: GPTQConfig,
    *,
    cache: MutableMapping[tuple[str, str], QuantizedTensor | None] | None = None,
    name: str = "",
) -> QuantizedTensor | None:
    """The quantized weight of one target (None for keep formats); a row-mixed format reads
    and fills ``cache`` (by (``name``, spec)) for its two whole-weight parts."""
    if fmt.keep:
        return None
    if fmt.hi is not None:
        memo = {} if cache is None else cache

        def part(f: QuantFormat) -> QuantizedTensor:
            if (name, f.spec()) not in memo:
                memo[(name, f.spec())] = _quantize_one(w, f, st, cfg)
            got = memo[(name, f.spec())]
            assert got is not None
            return got

        importance = st.diag if st is not None and fmt.method == "mse" else None
        return quantize(w, fmt, importance=importance, part=part)
    if fmt.method == "gptq":
        assert st is not None and st.full is not None
        return gptq_quantize(
            w,
            st.full,
            fmt,
            damp=cfg.damp,
            block_size=cfg.block_size,
            act_order=cfg.act_order,
            grid=cfg.grid,
        ).quantized
    importance = st.diag if st is not None and fmt.method == "mse" else None
    return quantize(w, fmt, importance=importance)


def _write_fake(module: nn.Module, qt: QuantizedTensor | None) -> None:
    """Overwrite ``module``'s float weight with its quantized value (keep: fp16-rounded)."""
    w = _weight(module)
    w.copy_(dequantize(qt).to(w.dtype) if qt is not None else w.half().to(w.dtype))


def _rowmix_linears(
    t: Target, fmt: QuantFormat, owners: Sequence[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Linear]]:
    """The owners of a row- or column-mixed target, which must all be Linear layers
    (``RowMixLinear``, ``ColMixLinear``)."""
    linears = [(n, m) for n, m in owners if isinstance(m, nn.Linear)]
    if len(linears) != len(owners):
        what = "column" if fmt.hi_axis == "cols" else "row"
        raise MpqError(
            f"{t.name}: {what}-mixed format {fmt.spec()} is packed for Linear layers only; give "
            f"this {t.kind} a plain format, or apply the plan with mode='fake'"
        )
    return linears


def _mix_class(fmt: QuantFormat) -> type[RowMixLinear]:
    """The packed module of a row- or column-mixed format."""
    return ColMixLinear if fmt.hi_axis == "cols" else RowMixLinear


def _install(
    out: nn.Module,
    t: Target,
    fmt: QuantFormat,
    qt: QuantizedTensor | None,
    mode: Mode,
    backend: str,
    act: ActQuant,
) -> None:
    """Put one target's quantized weight into ``out`` (fake: float weight + activation hooks;
    packed: the packed module, for the target and its aliases)."""
    module = out.get_submodule(t.name)
    owners = [(t.name, module)] + [(a, out.get_submodule(a)) for a in t.aliases]
    if fmt.hi is not None and mode == "packed":
        assert qt is not None, "a row-mixed format quantizes both parts"
        for name, lin in _rowmix_linears(t, fmt, owners):
            bias = lin.bias.detach() if lin.bias is not None else None
            _set_module(out, name, _mix_class(fmt).build(qt, bias, backend, act, name))
        return
    if mode == "fake":
        _write_fake(module, qt)
        if fmt.act_bits != KEEP_BITS:
            for _, mod in owners:
                if isinstance(mod, (nn.Linear, nn.Conv2d)):
                    dim = -1 if isinstance(mod, nn.Linear) else 1
                    mod.register_forward_pre_hook(_act_pre_hook(fmt.act_bits, act, dim))
        return
    if qt is not None:
        packed = PackedWeight.from_quantized(qt)
    else:
        packed = PackedWeight(_weight(module), fmt)
    for name, mod in owners:
        _set_module(out, name, _packed_module(mod, packed, name, backend, act))


def _apply_sequential(
    out: nn.Module,
    plan: BitPlan,
    targets: Sequence[Target],
    calib: Iterable[Any],
    cfg: GPTQConfig,
    act: ActQuant,
    qts: dict[str, QuantizedTensor | None],
) -> str | None:
    """Quantize the Linear targets inside ``out``'s blocks sequentially (:mod:`mpq.sequential`)
    into ``qts``, writing each quantized weight into ``out`` (with its activation quantizer for
    the passes after it) so that every later layer sees the quantized model. Targets outside
    the blocks whose formats use no statistics are quantized first (an embedding changes block
    0's input); those that do keep full-precision statistics. Returns the reason when the model
    is not recognized (then ``qts`` is left as it was)."""
    linear = [t.name for t in targets if t.kind == "linear"]
    found = find_blocks(out, linear)
    if isinstance(found, str):
        return found
    prefix = found[0]
    inside = [n for n in linear if block_index(prefix, n) is not None]
    needs = {}
    for n in inside:
        fmt = plan.formats[n]
        data = fmt.method in DATA_METHODS and not fmt.keep
        needs[n] = Need(diag=data, full=data and fmt.method == "gptq")
    hooks: list[Any] = []
    fresh: dict[str, QuantizedTensor | None] = {}

    def quantize_and_write(name: str, st: InputStats | None) -> None:
        fmt = plan.formats[name]
        module = out.get_submodule(name)
        fresh[name] = qt = _quantize_one(_weight(module), fmt, st, cfg)
        _write_fake(module, qt)
        if fmt.act_bits != KEEP_BITS:
            hooks.append(module.register_forward_pre_hook(_act_pre_hook(fmt.act_bits, act, -1)))

    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for t in targets:  # outside the blocks, no statistics: quantized before the pass
                fmt = plan.formats[t.name]
                if t.name in needs or (fmt.method in DATA_METHODS and weighted_by_input(t)):
                    continue
                module = out.get_submodule(t.name)
                saved[t.name] = _weight(module).detach().clone()
                fresh[t.name] = _quantize_one(_weight(module), fmt, None, cfg)
                _write_fake(module, fresh[t.name])
        reason = run_sequential(
            out, calib, inside, needs, quantize_and_write, granularity=cfg.sequential
        )
    finally:
        for h in hooks:
            h.remove()
    if reason is not None:
        with torch.no_grad():  # not recognized: nothing was quantized inside; undo the rest
            for name, w in saved.items():
                _weight(out.get_submodule(name)).copy_(w)
        return reason
    qts.update(fresh)
    return None


def backends(model: nn.Module) -> dict[str, str]:
    """Which kernel backend runs each quantized module (the choice is never silent)."""
    return {
        name: str(m.backend) for name, m in model.named_modules() if isinstance(m, QUANT_MODULES)
    }


def kernels(model: nn.Module) -> dict[str, str]:
    """The op each packed Linear runs (e.g. ``aten._weight_int8pack_mm``)."""
    return {name: m.kernel for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_backend(model: nn.Module, backend: str) -> dict[str, str]:
    """Re-choose the backend of every packed Linear (e.g. ``auto`` after moving to a GPU)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend(backend)
    return backends(model)


def resident_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the model's state dict, each tensor's memory counted once: what the cost model
    predicts; bytes of the backend-only runtime buffers of the quantized modules, e.g. the CPU
    int4 op's repacked codes). Other non-persistent buffers (rotary tables) are in neither."""
    from mpq.cost import state_bytes

    state = state_bytes(model.state_dict())
    runtime = sum(m.runtime_bytes() for m in model.modules() if isinstance(m, QUANT_MODULES))
    return state, runtime


def load_packed(
    model: nn.Module,
    targets: Sequence[Target],
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    plan: BitPlan | None = None,
    *,
    backend: str = "reference",
    act: ActQuant = DEFAULT_ACT_QUANT,
) -> nn.Module:
    """A packed model rebuilt from a safetensors file of :func:`save_packed` (its plan is read
    from the metadata; ``plan``, when given, must match it) or from a state dict (then ``plan``
    is required). ``model`` gives the architecture; it is copied, not changed.

    Raises :class:`MpqError` for missing or unexpected tensors, and for any packed tensor whose
    shape, dtype or padding bits differ from what the plan stores (edited or foreign tensors).
    """
    B.check_request(backend)
    state: dict[str, torch.Tensor]
    if isinstance(source, Mapping):
        state = dict(source)
        if plan is None:
            raise MpqError("load_packed from a state dict needs the plan it was packed with")
    else:
        state, plan = _read_file(Path(source), plan)
    plan.validate(targets)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in targets:
            fmt = plan.formats[t.name]
            module = out.get_submodule(t.name)
            owners = [(t.name, module)] + [(a, out.get_submodule(a)) for a in t.aliases]
            shape = tuple(_weight(module).shape)
            if fmt.hi is not None:
                for name, lin in _rowmix_linears(t, fmt, owners):
                    mix = _mix_class(fmt).empty(shape, fmt, lin.bias is not None, act, name)
                    _set_module(out, name, mix)
                continue
            packed = PackedWeight.empty(shape, fmt)
            for name, mod in owners:
                if not isinstance(mod, nn.Linear):  # Linear backends are set after loading
                    B.check_layer(backend, name, _kind(mod), packed.rows, packed.cols, fmt)
                _set_module(out, name, _packed_module(mod, packed, name, "reference", act))
    expected = out.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise MpqError(
            f"packed tensors do not match the plan: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; was the file written for another plan or model?"
        )
    for k, ref in expected.items():
        got = state[k]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise MpqError(
                f"{k}: expected {ref.dtype} {list(ref.shape)} for this plan, found {got.dtype} "
                f"{list(got.shape)}; the packed tensors were edited or belong to another plan"
            )
    out.load_state_dict(state, strict=True)
    for t in targets:
        mod = out.get_submodule(t.name)
        assert isinstance(mod, QUANT_MODULES)
        if isinstance(mod, RowMixLinear):
            mod.check(t.name)
        else:
            mod.packed.check(t.name)
    if backend != "reference":
        set_backend(out, backend)
    return out


def _read_file(path: Path, plan: BitPlan | None) -> tuple[dict[str, torch.Tensor], BitPlan]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise MpqError(f"packed model file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:
        raise MpqError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    stored = BitPlan.from_json(meta["mpq_plan"]) if "mpq_plan" in meta else None
    if plan is None:
        if stored is None:
            raise MpqError(f"{str(path)!r} has no mpq plan in its metadata; pass the plan")
        plan = stored
    elif stored is not None and dict(stored.formats) != dict(plan.formats):
        raise MpqError(f"{str(path)!r} was packed with another plan than the one given")
    for alias, first in json.loads(meta.get("__aliases__", "{}")).items():
        if first in state:
            state[alias] = state[first]
    return state, plan
