"""Where scales fold: the fold rules (data) and the fold plan of a model."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.precondition.spec import ALL_GROUPS
from mpq.targets import Target, module_kind

_NORM_NAMES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "RMSNorm")


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
