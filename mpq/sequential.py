"""Sequential calibration through a model's decoder blocks (GPTQ's order).

GPTQ fits each layer to its input Hessian ``H = mean(x x^T)``. Collected from the
full-precision model in one pass, ``H`` describes inputs the quantized model never sees: every
layer's input has already moved by the quantization of the layers before it. The reference
implementations (IST-DASLab/gptq, AutoGPTQ) therefore go block by block: block ``i``'s layers
get their statistics from block ``i``'s input *in the model whose blocks < i are quantized*, and
the block's output is recomputed after quantizing it. Within a block (``granularity="layer"``,
GPTQ's "true sequential"), the layers are quantized in the order their inputs appear: q/k/v on
the block input, then o_proj on the attention output of the quantized q/k/v, then gate/up, then
down_proj; ``granularity="block"`` takes every layer of a block from the block's input.

:func:`run_sequential` captures the input of the first block once per calibration batch (the
rest of the forward pass is skipped), then per block: one pass of that block over the batches per
stage (only the stage's statistics are accumulated; the pass stops at the stage's last layer),
the stage's layers quantized by the caller's ``quantize`` (which writes the quantized weight
into the model), and one pass to get the next block's input. On a llama block about 2.5 block
passes per block (q/k/v ~0, o, gate/up and down partial, the output whole): a few fp forward
passes in all.
Nothing is cached: the statistics depend on the plan of every earlier block.

Recognized: models whose targets live in one ``nn.ModuleList`` of blocks (Hugging Face decoder
layouts: ``model.layers``, GPT-2's ``transformer.h``) called as ``block(hidden, ...)``. The first
block's fp output must equal the second block's input captured from the plain forward pass (a
check that the captured arguments are complete); otherwise the reason is returned and nothing is
changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpq.layerstats import InputStats, InputSums
from mpq.models import run_batch

GRANULARITIES = ("layer", "block")
# The block path must reproduce the plain forward's second-block input (float32 reordering).
CHECK_ATOL = 1e-4
CHECK_RTOL = 1e-4

#: ``quantize(name, stats)``: quantize target ``name`` in place with its statistics (None when
#: its format uses none).
QuantizeFn = Callable[[str, "InputStats | None"], None]


@dataclass(frozen=True)
class Need:
    """What one target's format needs from the calibration inputs: nothing, the diagonal
    (importance) or the full second moment (Hessian)."""

    diag: bool
    full: bool


def find_blocks(model: nn.Module, names: Sequence[str]) -> tuple[str, nn.ModuleList] | str:
    """The ``(prefix, blocks)`` ModuleList holding the most of ``names`` as ``prefix.<i>.…``, or
    the reason there is none."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not prefix or len(mod) == 0:
            continue
        inside = sum(1 for n in names if n.startswith(prefix + "."))
        if inside and (best is None or inside > best[0]):
            best = (inside, prefix, mod)
    if best is None:
        return "no target lives in a list of blocks (nn.ModuleList)"
    return best[1], best[2]


def block_index(prefix: str, name: str) -> int | None:
    """The block number of ``name`` under ``prefix`` (None outside the blocks)."""
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


class _Stop(Exception):
    pass


@dataclass
class _Batch:
    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _clean(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Block keyword arguments without the KV cache (each block pass starts fresh)."""
    out = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    for key in ("cache", "past_key_value", "past_key_values", "layer_past"):
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _capture(
    model: nn.Module, blocks: nn.ModuleList, batches: Iterable[Any]
) -> tuple[list[_Batch], torch.Tensor | None] | str:
    """Block 0's input and arguments per batch; block 1's input on the first batch (the check)."""
    got: list[_Batch] = []
    second: list[torch.Tensor] = []

    def first(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(h, torch.Tensor):
            raise _Stop("a block is called without its hidden states first")
        got.append(_Batch(h.detach(), tuple(args[1:]), _clean(kwargs)))
        if len(got) > 1:  # the first batch goes on to block 1's input (the check)
            raise _Stop

    def next_block(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs.get("hidden_states")
        if isinstance(h, torch.Tensor):
            second.append(h.detach())
        raise _Stop

    handles = [blocks[0].register_forward_pre_hook(first, with_kwargs=True)]
    if len(blocks) > 1:
        handles.append(blocks[1].register_forward_pre_hook(next_block, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run_batch(model, batch)
                except _Stop as stop:
                    if stop.args:
                        return str(stop.args[0])
    finally:
        for h in handles:
            h.remove()
    if not got:
        return "the calibration data has no batches, or the model never called its blocks"
    return got, second[0] if second else None


def _run_block(block: nn.Module, b: _Batch) -> torch.Tensor:
    out = block(b.hidden, *b.args, **b.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _stages(block: nn.Module, b: _Batch, names: Sequence[str], prefix: str) -> list[list[str]]:
    """``names`` (relative to ``prefix``) grouped by the input tensor they read, in the order the
    block reads them (one pass on one batch)."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda mod, inp, n=n: order.append((n, inp[0]))
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            _run_block(block, b)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    seen: set[str] = set()
    last: torch.Tensor | None = None
    for n, x in order:
        if n in seen:
            continue
        seen.add(n)
        if last is None or x is not last:
            stages.append([])
            last = x
        stages[-1].append(n)
    # A target the pass never reached still gets quantized (with the last stage's statistics
    # refused later by InputSums if it needs any).
    stages.extend([n] for n in names if n not in seen)
    return stages


def run_sequential(
    model: nn.Module,
    calib: Iterable[Any],
    names: Sequence[str],
    needs: Mapping[str, Need],
    quantize: QuantizeFn,
    *,
    granularity: str = "layer",
    progress: bool = True,
) -> str | None:
    """Quantize the targets ``names`` (in the model's blocks) block by block; see the module
    docstring. ``needs[name]`` says which statistics a target's format uses; ``quantize`` is
    called once per target, in order, and must write the quantized weight into ``model``.
    Returns None when done, or the reason the model is not recognized (nothing changed)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}; use one of {GRANULARITIES}")
    found = find_blocks(model, names)
    if isinstance(found, str):
        return found
    prefix, blocks = found
    by_block: dict[int, list[str]] = {}
    for n in names:
        i = block_index(prefix, n)
        if i is None:
            return f"{n} is not inside the blocks {prefix}"
        by_block.setdefault(i, []).append(n)
    captured = _capture(model, blocks, getattr(calib, "batches", calib))
    if isinstance(captured, str):
        return captured
    batches, second = captured
    with torch.no_grad():
        if second is not None:
            h1 = _run_block(blocks[0], batches[0])
            if h1.shape != second.shape or not torch.allclose(
                h1, second, atol=CHECK_ATOL, rtol=CHECK_RTOL
            ):
                return f"running {prefix}.0 alone does not reproduce the model's next block input"
        last = max(by_block)
        for i in tqdm(range(last + 1), desc="sequential calibration", disable=not progress):
            block = blocks[i]
            todo = [n[len(prefix) + len(str(i)) + 2 :] for n in by_block.get(i, [])]
            if todo:
                stages = _stages(block, batches[0], todo, "") if granularity == "layer" else [todo]
                for stage in stages:
                    _quantize_stage(block, batches, stage, f"{prefix}.{i}.", needs, quantize)
            if i < last:
                for b in batches:
                    b.hidden = _run_block(block, b).detach()
    return None


def _quantize_stage(
    block: nn.Module,
    batches: Sequence[_Batch],
    stage: Sequence[str],
    prefix: str,
    needs: Mapping[str, Need],
    quantize: QuantizeFn,
) -> None:
    """One block pass collecting the statistics ``stage`` needs, then its targets quantized."""
    data = [n for n in stage if needs[prefix + n].diag or needs[prefix + n].full]
    stats: dict[str, InputStats] = {}
    if data:
        sums = InputSums(data, [n for n in data if needs[prefix + n].full])
        handles = sums.hooks(block)

        def stop(mod: nn.Module, inp: Any) -> None:
            raise _Stop  # the stage's inputs are all seen: the rest of the block is not needed

        # Registered after the sums' hooks, on the module the stage reaches last.
        handles.append(block.get_submodule(data[-1]).register_forward_pre_hook(stop))
        try:
            for b in batches:
                try:
                    _run_block(block, b)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        stats = sums.result()
    for n in stage:
        quantize(prefix + n, stats.get(n))
