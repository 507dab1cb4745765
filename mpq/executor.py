"""`apply_plan`: put a bit plan onto a real model.

``mode="packed"`` replaces every target with a module that stores packed integer codes, scales
and zero-points (:mod:`mpq.kernels.modules`) and dequantizes in its forward: what gets deployed,
with exactly the bytes the cost model counts. ``mode="fake"`` overwrites each target's float
weight with its dequantized value: the same outputs within float tolerance, at full speed, for
search loops. The executor never decides bits; it applies what the plan says.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.kernels.modules import PackedWeight, QuantConv2d, QuantEmbedding, QuantLinear
from mpq.plan import BitPlan
from mpq.quantize import fake_quantize
from mpq.targets import Target

Mode = Literal["packed", "fake"]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def _packed_module(module: nn.Module, packed: PackedWeight) -> nn.Module:
    if isinstance(module, nn.Linear):
        return QuantLinear(packed, module.bias)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(packed, module)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(packed, module)
    raise MpqError(
        f"cannot quantize a {type(module).__name__}; targets are Linear/Conv2d/Embedding"
    )


def apply_plan(
    model: nn.Module,
    plan: BitPlan,
    targets: Sequence[Target],
    *,
    mode: Mode = "packed",
    inplace: bool = False,
) -> nn.Module:
    """The model with ``plan`` applied (a copy unless ``inplace``)."""
    if mode not in ("packed", "fake"):
        raise MpqError(f"mode={mode!r} is unknown; use 'packed' or 'fake'")
    plan.validate(targets)
    out = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for t in targets:
            fmt = plan.formats[t.name]
            module = out.get_submodule(t.name)
            if mode == "fake":
                w = _weight(module)
                w.copy_(fake_quantize(w, fmt))
                continue
            packed = PackedWeight(_weight(module), fmt)
            owners = [(t.name, module)] + [(a, out.get_submodule(a)) for a in t.aliases]
            for name, mod in owners:
                _set_module(out, name, _packed_module(mod, packed))
    return out


def backends(model: nn.Module) -> dict[str, str]:
    """Which kernel backend runs each quantized module (the choice is never silent)."""
    return {
        name: str(m.backend)
        for name, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv2d, QuantEmbedding))
    }
