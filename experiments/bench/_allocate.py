"""What the allocation probes share (``bench_cols.py``, ``bench_low.py``): a Lagrangian plan
over average bits from per-matrix damage and cost tables, and held-out scoring of a plan whose
weights a probe builds itself."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from mpq.evaluate import evaluate
from mpq.pipeline import Evaluator


def lagrange_plan(
    dmg: Mapping[str, Mapping[str, float]],
    cost: Mapping[str, Mapping[str, float]],
    specs: Sequence[str],
    budget: float,
    total: int,
) -> dict[str, str]:
    """Per matrix the spec minimizing ``damage + lam * bits``, with the smallest ``lam`` (by
    bisection in log space) whose plan fits ``budget`` bits per weight over ``total`` weights."""

    def pick(lam: float) -> dict[str, str]:
        return {n: min(specs, key=lambda s: dmg[n][s] + lam * cost[n][s]) for n in dmg}

    def bits(lam: float) -> float:
        return sum(cost[n][s] for n, s in pick(lam).items()) / total

    lo, hi = 1e-15, 1e3
    for _ in range(100):
        lam = (lo * hi) ** 0.5
        lo, hi = (lo, lam) if bits(lam) <= budget else (lam, hi)
    return pick(hi)


def held_out(
    model: nn.Module,
    choice: Mapping[str, str],
    weight: Callable[[str, str], torch.Tensor],
    evals: Mapping[str, Evaluator],
    fp_ppl: Mapping[str, float] | None = None,
) -> list[str]:
    """Table cells (``ratio |`` when ``fp_ppl`` is given, then ``KL ± 1.96 se``) per held-out
    text of a copy of ``model`` with each matrix ``n`` set to ``weight(n, choice[n])``."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, s in choice.items():
            m.get_submodule(n).weight.copy_(weight(n, s))
    cells = []
    for d, ev in evals.items():
        r = evaluate(ev.task, m, ev.reference())
        kl = f"{r['kl']:.4f} ± {1.96 * r['kl_se']:.4f}"
        cells.append(kl if fp_ppl is None else f"{r['ppl'] / fp_ppl[d]:.3f} | {kl}")
    return cells
