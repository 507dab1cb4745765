"""Calibration statistics of each fold group's shared input (one forward pass)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpq.models import run_batch
from mpq.precondition.rules import FoldGroup
from mpq.tasks import Task


@dataclass
class GroupStats:
    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    tokens: int = 0


def collect_stats(
    model: nn.Module, folds: Sequence[FoldGroup], calib: Task | Iterable[Any], gram: bool
) -> dict[str, GroupStats]:
    """Per fold group (keyed by its first layer): per-channel max|X|, sum|X|, token count and,
    with ``gram``, ``X^T X`` (float64), from one forward pass over ``calib``."""
    batches = calib.batches if isinstance(calib, Task) else calib
    stats = {g.layers[0]: GroupStats() for g in folds}
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
