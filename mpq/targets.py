"""Targets: the quantizable weights of a model, found by fully qualified name in model order.

Tie groups (tensors that must share one format, e.g. q/k/v of an attention block so they can be
fused) are data: a :class:`TieRule` maps a name regex to a group key. Modules that share one
weight tensor (a tied embedding and LM head) form a single target whose later owners are
listed as ``aliases``; the tensor is stored and counted once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpq.errors import MpqError

if TYPE_CHECKING:
    from torch import nn

# torch is imported by the functions that read a model, so that plans, costs and problems
# (which only name targets) load without it.


def module_kind(module: nn.Module) -> str | None:
    """The target kind of ``module`` by its exact type (Linear, Conv2d, Embedding), else None."""
    from torch import nn

    kinds: dict[type[nn.Module], str] = {
        nn.Linear: "linear",
        nn.Conv2d: "conv2d",
        nn.Embedding: "embedding",
    }
    return kinds.get(type(module))


@dataclass(frozen=True)
class TieRule:
    """Targets whose name matches ``pattern`` share the group key ``key.format(**groups)``."""

    pattern: str
    key: str

    def match(self, name: str) -> str | None:
        m = re.search(self.pattern, name)
        return self.key.format(**m.groupdict()) if m else None


# Fused projections of common transformer blocks (LLaMA/Mistral/Qwen naming, BERT naming).
DEFAULT_TIE_RULES: tuple[TieRule, ...] = (
    TieRule(r"^(?P<p>.+)\.(q_proj|k_proj|v_proj)$", "{p}.qkv"),
    TieRule(r"^(?P<p>.+)\.(gate_proj|up_proj)$", "{p}.gate_up"),
    TieRule(r"^(?P<p>.+)\.attention\.self\.(query|key|value)$", "{p}.attention.self.qkv"),
)


@dataclass(frozen=True)
class Target:
    """One quantizable weight: module ``name``, ``kind``, weight ``shape``, tie group key."""

    name: str
    kind: str
    shape: tuple[int, ...]
    tie: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def decision(self) -> str:
        """The name of the allocation decision this target belongs to (its tie key or itself)."""
        return self.tie if self.tie is not None else self.name


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise MpqError(f"{what} pattern {p!r} is not a valid regex: {exc}") from exc
    return out


def discover(
    model: nn.Module,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    tie_rules: Sequence[TieRule] = DEFAULT_TIE_RULES,
) -> list[Target]:
    """Every Linear / Conv2d / Embedding weight of ``model``, in model order.

    ``include``/``exclude`` are regexes searched in the module name; a module is kept when it
    matches some include pattern (or none are given) and no exclude pattern. A weight shared by
    several modules is one target named after its first owner; the filters apply to that name.
    """
    from torch import nn

    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    order: list[int] = []
    for name, module in model.named_modules():
        if module_kind(module) is None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        key = id(weight)
        if key not in owners:
            owners[key] = []
            order.append(key)
        owners[key].append((name, module))
    targets: list[Target] = []
    for key in order:
        (name, module), *rest = owners[key]
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        tie = next((k for r in tie_rules if (k := r.match(name)) is not None), None)
        weight, kind = module.weight, module_kind(module)
        assert isinstance(weight, nn.Parameter) and kind is not None
        targets.append(
            Target(
                name=name,
                kind=kind,
                shape=tuple(weight.shape),
                tie=tie,
                aliases=tuple(n for n, _ in rest),
            )
        )
    if not targets:
        raise MpqError(
            f"no Linear/Conv2d/Embedding weights left after include={list(include)} "
            f"exclude={list(exclude)}; loosen the patterns"
        )
    return _drop_singleton_ties(targets)


def _drop_singleton_ties(targets: list[Target]) -> list[Target]:
    """A tie key with one member (its siblings were excluded) constrains nothing: drop it."""
    counts: dict[str, int] = {}
    for t in targets:
        if t.tie is not None:
            counts[t.tie] = counts.get(t.tie, 0) + 1
    return [
        t
        if t.tie is None or counts[t.tie] > 1
        else Target(t.name, t.kind, t.shape, None, t.aliases)
        for t in targets
    ]


def decisions(targets: Sequence[Target]) -> dict[str, list[Target]]:
    """Group targets into allocation decisions (tie groups or single targets), in model order."""
    out: dict[str, list[Target]] = {}
    for t in targets:
        out.setdefault(t.decision, []).append(t)
    return out


def find_target(targets: Sequence[Target], name: str) -> Target:
    """The target called ``name``; an unknown name gets close matches in the error."""
    for t in targets:
        if t.name == name:
            return t
    raise MpqError(unknown_name_message(name, [t.name for t in targets]))


def unknown_name_message(name: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {close}?" if close else "; run `mpq inspect` to list the targets"
    return f"unknown layer {name!r}: the model has no such target{hint}"
