"""Does a lower floor pay? The main job's palette with and without 2-bit formats below it.

The main job's anchored table (``experiments/configs/smollm2.toml``, read from the cache or
measured) gives every palette format's damage; each extra format's damage is the anchor's
scaled by the layer's output error ``tr(dW H dW^T)``, the anchored table's own rule. Plans come
from a Lagrangian over the budget in average bits (one decision per matrix, as the main job),
with and without the extra formats, and are scored on held-out wiki and bbc (16 x 512 tokens
each, KL to fp32 paired per position):

    MPQ_THREADS=2 PYTHONPATH=. python experiments/bench/bench_low.py \
        --budgets 3.5,4.0 --extra "2:g16:asym:dq4:mse,2:g16:asym:dq4:mse+3:g32:dq:mse@50"
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from _allocate import held_out, lagrange_plan  # experiments/bench/_allocate.py

from mpq.compare import _estimator, _stats_task
from mpq.config import load_config
from mpq.cost import weight_bits
from mpq.formats import QuantFormat
from mpq.layerstats import cached_input_stats
from mpq.models import cache_root
from mpq.pipeline import Evaluator, sensitivity_table
from mpq.prepared import prepare
from mpq.quant.quantize import dequantize, quantize
from mpq.sensitivity.measured import output_error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="experiments/configs/smollm2.toml")
    ap.add_argument("--budgets", default="3.5,4.0")
    ap.add_argument("--extra", default="2:g16:asym:dq4:mse")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    cfg = load_config(args.config)
    prep = prepare(cfg.model, cfg.include, cfg.exclude, cfg.ties)
    stats_task = _stats_task(cfg, prep.loaded)
    calib = cfg.calibration.spec().task(prep.loaded, 0)
    est = _estimator(cfg.estimators[0], 0)
    table = sensitivity_table(
        prep, est, cfg.formats, calib, stats_task=stats_task, progress=True
    )  # fmt: skip
    anchor = QuantFormat.parse(est.anchor).spec()  # type: ignore[attr-defined]
    names = [t.name for t in prep.targets]
    stats = cached_input_stats(
        prep.loaded.model, names, stats_task, model_id=prep.loaded.model_id,
        cache_root=cache_root() / "stats", full=names, progress=True,
    )  # fmt: skip
    model = prep.loaded.model
    base = [f.spec() for f in cfg.formats]
    extra = [QuantFormat.parse(s) for s in args.extra.split(",") if s]
    deq: dict[tuple[str, str], torch.Tensor] = {}

    def weight_at(name: str, f: QuantFormat) -> torch.Tensor:
        key = (name, f.spec())
        if key not in deq:
            w = model.get_submodule(name).weight.detach()
            imp = stats[name].diag if f.method == "mse" else None
            deq[key] = dequantize(quantize(w, f, importance=imp)).float()
        return deq[key]

    t0 = time.time()
    dmg: dict[str, dict[str, float]] = {}
    for t in prep.targets:
        st = stats[t.name]
        w = model.get_submodule(t.name).weight.detach()
        row = {s: float(table.distortions[t.name][s]) for s in base}
        e_anchor = output_error(weight_at(t.name, QuantFormat.parse(anchor)) - w, st.diag, st.full)
        for f in extra:
            e = output_error(weight_at(t.name, f) - w, st.diag, st.full)
            row[f.spec()] = row[anchor] * e / e_anchor
        dmg[t.name] = row
    print(f"extra formats quantized in {time.time() - t0:.0f} s", flush=True)
    everything = [*cfg.formats, *extra]
    total = sum(t.numel for t in prep.targets)
    cost = {t.name: {f.spec(): float(weight_bits(tuple(t.shape), f)) for f in everything}
            for t in prep.targets}  # fmt: skip

    evals = {
        d: Evaluator(prep, cfg.evaluation.spec(d).task(prep.loaded), progress=False)
        for d in cfg.evaluation.data
    }
    fmt_of = {f.spec(): f for f in everything}
    print("| palette | budget | bits | predicted (table) | layers at the extra formats | "
          + " | ".join(f"{d} KL ± 1.96 se" for d in evals) + " |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|" * len(evals), flush=True)
    variants: dict[str, Callable[[], list[str]]] = {
        "main": lambda: base, "main + extra": lambda: base + [f.spec() for f in extra],
    }  # fmt: skip
    for budget in [float(b) for b in args.budgets.split(",")]:
        for label, specs in variants.items():
            choice = lagrange_plan(dmg, cost, specs(), budget, total)
            pred = sum(dmg[n][s] for n, s in choice.items())
            used = sum(cost[n][s] for n, s in choice.items()) / total
            n_extra = sum(s in {f.spec() for f in extra} for s in choice.values())
            cells = held_out(model, choice, lambda n, s: weight_at(n, fmt_of[s]), evals)
            print(f"| {label} | {budget} | {used:.3f} | {pred:.4f} | {n_extra} | "
                  + " | ".join(cells) + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
