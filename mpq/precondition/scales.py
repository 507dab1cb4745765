"""The scale math (scale folding, AWQ's search) and folding the scales into the model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mpq.formats import QuantFormat
from mpq.precondition.rules import FoldedEntry, FoldGroup
from mpq.precondition.spec import PreconditionSpec
from mpq.precondition.stats import GroupStats
from mpq.quant.quantize import fake_quantize


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


def sf_scales(
    model: nn.Module, g: FoldGroup, st: GroupStats, spec: PreconditionSpec
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


def awq_scales(
    model: nn.Module, g: FoldGroup, st: GroupStats, spec: PreconditionSpec
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


def fold_scales(model: nn.Module, g: FoldGroup, s_prev: torch.Tensor) -> None:
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
