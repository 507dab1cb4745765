"""Cached decoder-block inputs: measure a layer's damage from its own block to the logits.

Measured damage quantizes one target and runs the calibration windows through the whole model.
Everything before the target's decoder block is the fp model's computation and the same for
every target and format, so :func:`capture` runs each calibration batch once through the fp
model and keeps every block's input hidden states (and the keyword arguments the model passes
its blocks: attention mask, rotary embeddings). :meth:`BlockCache.logits` then runs only block
``i`` (once per format, each with its own quantized weight), stacks the formats along the batch
axis and runs blocks ``i+1 ..`` and the head once for all of them.

Recognized: Hugging Face decoder-only language models laid out as ``model.model.layers``
(a ``ModuleList`` of blocks returning the hidden states), ``model.model.norm`` and
``model.lm_head``, on a :func:`mpq.tasks.lm_head` task (logits of every next token). Anything
else (other layouts, logit soft-capping or scaling, encoder and CNN tasks), and any model for
which the check in :func:`capture` (the cached path reproduces the fp logits of the first
batch) fails, returns a reason instead, and measured damage uses the plain path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpq.tasks import Task, lm_head

# The cached path must reproduce the fp logits of the plain forward up to float32 reordering.
CHECK_ATOL = 1e-3
CHECK_RTOL = 1e-4
# Rows (windows x positions x formats) one batched tail runs at once: bounds the logits' memory.
MAX_ROWS = 2048


@dataclass(frozen=True)
class BatchInputs:
    """One calibration batch: each block's input hidden states and the blocks' other arguments."""

    hidden: tuple[torch.Tensor, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class BlockCache:
    """The fp model's block inputs on every calibration batch (see the module docstring)."""

    model: nn.Module
    prefix: str
    blocks: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    batches: tuple[BatchInputs, ...]

    def block_of(self, names: Sequence[str]) -> int | None:
        """The block every module in ``names`` lives in, or None (outside blocks, or several)."""
        found: set[int] = set()
        pattern = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)\.")
        for name in names:
            m = pattern.match(name)
            if m is None:
                return None
            found.add(int(m.group(1)))
        return found.pop() if len(found) == 1 else None

    def _block(self, i: int, hidden: torch.Tensor, b: BatchInputs, kwargs: dict[str, Any]) -> Any:
        out = self.blocks[i](hidden, *b.args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def hidden_after(self, start: int, batch: int) -> torch.Tensor:
        """Block ``start``'s output on batch ``batch`` with the model's current weights."""
        b = self.batches[batch]
        return self._block(start, b.hidden[start], b, b.kwargs)

    def tail_logits(self, start: int, batch: int, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``[len(hidden) * units, positions, vocab]`` of blocks ``start ..`` and the head
        for several versions of block ``start - 1``'s output, stacked along the batch axis."""
        b = self.batches[batch]
        units = hidden[0].shape[0]
        h = torch.cat(list(hidden), dim=0)
        kwargs = _repeat(b.kwargs, units, len(hidden))
        for i in range(start, len(self.blocks)):
            h = self._block(i, h, b, kwargs)
        return self.head(self.norm(h))[:, :-1]


def _repeat(obj: Any, units: int, times: int) -> Any:
    """Tensors (also inside tuples, lists, dicts) whose first axis is the batch, ``times`` times."""
    if times == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.ndim > 0 and obj.shape[0] == units and units > 1:
            return obj.repeat(times, *([1] * (obj.ndim - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_repeat(x, units, times) for x in obj)
    if isinstance(obj, list):
        return [_repeat(x, units, times) for x in obj]
    if isinstance(obj, dict):
        return {k: _repeat(v, units, times) for k, v in obj.items()}
    return obj


def _layout(model: nn.Module, task: Task) -> tuple[nn.ModuleList, nn.Module, nn.Module] | str:
    if task.family != "causal_lm" or task.head is not lm_head:
        return f"the task is not a next-token language-model task ({task.family})"
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return f"{type(model).__name__} has no decoder blocks at model.layers"
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        return f"{type(model).__name__} has no model.norm / lm_head after its blocks"
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return f"{type(model).__name__} transforms its logits ({attr})"
    return blocks, norm, head


def capture(model: nn.Module, task: Task) -> BlockCache | str:
    """The block cache of ``model`` on ``task``'s batches, or the reason it cannot be used."""
    layout = _layout(model, task)
    if isinstance(layout, str):
        return layout
    blocks, norm, head = layout
    batches: list[BatchInputs] = []
    for ids in task.batches:
        got = _capture_batch(model, blocks, ids)
        if isinstance(got, str):
            return got
        batches.append(got)
    cache = BlockCache(model, _prefix(model, blocks), blocks, norm, head, tuple(batches))
    return _check(cache, task)


class _Unrecognized(Exception):
    pass


def _capture_batch(model: nn.Module, blocks: nn.ModuleList, ids: Any) -> BatchInputs | str:
    hidden: list[torch.Tensor] = []
    seen: dict[str, Any] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(h, torch.Tensor):
            raise _Unrecognized("a block is called without its hidden states first")
        hidden.append(h.detach())
        if "args" not in seen:
            seen["args"] = args[1:]
            seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    handles = [blk.register_forward_pre_hook(hook, with_kwargs=True) for blk in blocks]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Unrecognized as exc:
        return str(exc)
    finally:
        for h in handles:
            h.remove()
    if len(hidden) != len(blocks):
        return f"the model called {len(hidden)} of its {len(blocks)} blocks"
    kwargs = dict(seen["kwargs"])
    for key in ("cache", "past_key_value", "past_key_values"):
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return BatchInputs(tuple(hidden), tuple(seen["args"]), kwargs)


def _prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is blocks:
            return name
    raise AssertionError("the blocks are a submodule of the model")


def _check(cache: BlockCache, task: Task) -> BlockCache | str:
    """The cached path (from block 0, two copies stacked) must give the plain path's logits."""
    with torch.no_grad():
        plain = task.head(cache.model, task.batches[0])
        h = cache.hidden_after(0, 0)
        both = cache.tail_logits(1, 0, [h, h])
    units = plain.shape[0]
    for part in (both[:units], both[units:]):
        if part.shape != plain.shape or not torch.allclose(
            part, plain, atol=CHECK_ATOL, rtol=CHECK_RTOL
        ):
            return "the cached block path does not reproduce the model's logits"
    return cache
