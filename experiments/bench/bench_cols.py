"""Column-mixed weights: the input columns that carry most of a layer's error at a higher format.

A probe for a unit of allocation across the *input* dimension (OWQ's observation: a few input
channels with large second moments carry most of the output error). For each decoder matrix
and low format LO, the ``k`` input columns with the largest ``H_jj * ||dW_lo[:, j]||^2`` are
cut out and quantized as their own ``[rows, k]`` matrix at HI; the other columns form a
``[rows, cols - k]`` matrix at LO (groups run over the remaining columns in order); storage =
both parts + a 1-bit column mask. Damage = the main job's table damage at LO times the output
error ratio ``tr(dW H dW^T)`` (full H), the anchored table's own rule. Plans: a Lagrangian over
average bits (one decision per matrix, as the main job) with and without the column mixes,
scored on held-out wiki and bbc (16 x 512 tokens each, KL paired per position).

    MPQ_THREADS=2 PYTHONPATH=. python experiments/bench/bench_cols.py --budgets 3.5,4.0,4.27,4.45
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import torch
from _allocate import held_out, lagrange_plan  # experiments/bench/_allocate.py
from tqdm import tqdm

from mpq.compare import _estimator, _stats_task
from mpq.config import load_config
from mpq.cost import weight_bits
from mpq.evaluate import evaluate
from mpq.formats import QuantFormat
from mpq.layerstats import cached_input_stats
from mpq.models import cache_root
from mpq.pipeline import Evaluator, sensitivity_table
from mpq.prepared import prepare
from mpq.quant.quantize import dequantize, quantize
from mpq.sensitivity.measured import output_error

_L3, _NL, _A4, _Q8 = (
    QuantFormat.parse(s).spec()
    for s in ("3:g32:dq:mse", "4:g32:nl:dq:mse", "4:g32:asym:dq:mse", "8:g32:dq")
)
HIGHS = {_L3: (_NL, _A4, _Q8), _NL: (_A4, _Q8)}  # the high formats of each low one (default)
KS = (32, 64, 128)


def q(w: torch.Tensor, f: QuantFormat, imp: torch.Tensor) -> torch.Tensor:
    return dequantize(quantize(w, f, importance=imp if f.method == "mse" else None)).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="experiments/configs/smollm2.toml")
    ap.add_argument("--budgets", default="3.5,4.0,4.27,4.45")
    ap.add_argument("--only-cols", action="store_true", help="skip the plans without columns")
    ap.add_argument("--base", default="", help="the table's formats the plans may use "
                    "(comma-separated; default: all of the config's)")  # fmt: skip
    ap.add_argument("--mixes", default="", help="LOW=HIGH,HIGH;LOW=HIGH: the column mixes to "
                    "probe (default: 3-bit with 4nl/4asym/8, 4nl with 4asym/8)")  # fmt: skip
    args = ap.parse_args()
    highs = HIGHS
    if args.mixes:
        highs = {
            QuantFormat.parse(lo).spec(): tuple(QuantFormat.parse(h).spec() for h in his.split(","))
            for lo, his in (m.split("=") for m in args.mixes.split(";"))
        }
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    cfg = load_config(args.config)
    prep = prepare(cfg.model, cfg.include, cfg.exclude, cfg.ties)
    stats_task = _stats_task(cfg, prep.loaded)
    calib = cfg.calibration.spec().task(prep.loaded, 0)
    est = _estimator(cfg.estimators[0], 0)
    table = sensitivity_table(prep, est, cfg.formats, calib, stats_task=stats_task, progress=False)
    names = [t.name for t in prep.targets]
    stats = cached_input_stats(
        prep.loaded.model, names, stats_task, model_id=prep.loaded.model_id,
        cache_root=cache_root() / "stats", full=names, progress=False,
    )  # fmt: skip
    model = prep.loaded.model
    base = [f.spec() for f in cfg.formats]
    if args.base:
        base = [QuantFormat.parse(s).spec() for s in args.base.split(",")]
        missing = sorted(set(base) - {f.spec() for f in cfg.formats})
        if missing:
            raise SystemExit(f"--base: {missing} are not among the config's formats")
    every = {*base, *highs, *(h for v in highs.values() for h in v)}
    fmt = {s: QuantFormat.parse(s) for s in every}
    total = sum(t.numel for t in prep.targets)
    dmg: dict[str, dict[str, float]] = {}
    cost: dict[str, dict[str, float]] = {}
    recipe: dict[tuple[str, str], tuple[str, str, torch.Tensor]] = {}
    t0 = time.time()
    for t in tqdm(prep.targets, desc="column mixes", unit="layer"):
        n, st = t.name, stats[t.name]
        w = model.get_submodule(n).weight.detach().float()
        imp = st.diag.float()
        dmg[n] = {s: float(table.distortions[n][s]) for s in base}
        cost[n] = {s: float(weight_bits(tuple(w.shape), fmt[s])) for s in base}
        rows, cols = w.shape
        for lo in highs:
            wl = q(w, fmt[lo], imp)
            e_lo = output_error(wl - w, st.diag, st.full)
            score = st.diag.float() * ((wl - w) ** 2).sum(0)
            order = torch.argsort(score, descending=True, stable=True)
            for k in KS:
                hc, lc = order[:k].sort().values, order[k:].sort().values
                part_lo = q(w[:, lc].contiguous(), fmt[lo], imp[lc])
                for hi in highs[lo]:
                    wq = torch.empty_like(w)
                    wq[:, lc] = part_lo
                    wq[:, hc] = q(w[:, hc].contiguous(), fmt[hi], imp[hc])
                    label = f"{lo}+{hi}#{k}"
                    dmg[n][label] = dmg[n][lo] * output_error(wq - w, st.diag, st.full) / e_lo
                    parts = weight_bits((rows, k), fmt[hi]) + weight_bits((rows, cols - k), fmt[lo])
                    cost[n][label] = float(parts + cols)  # + the 1-bit column mask
                    recipe[(n, label)] = (lo, hi, hc)
    print(f"column mixes quantized in {time.time() - t0:.0f} s", flush=True)
    labels = sorted({label for _, label in recipe})  # the probe's mixes (not the table's)

    def weight(n: str, s: str) -> torch.Tensor:
        w = model.get_submodule(n).weight.detach().float()
        imp = stats[n].diag.float()
        if (n, s) not in recipe:  # a table format (its own column mixes included)
            return q(w, fmt[s], imp)
        lo, hi, hc = recipe[(n, s)]
        mask = torch.zeros(w.shape[1], dtype=torch.bool)
        mask[hc] = True
        out = torch.empty_like(w)
        out[:, ~mask] = q(w[:, ~mask].contiguous(), fmt[lo], imp[~mask])
        out[:, mask] = q(w[:, mask].contiguous(), fmt[hi], imp[mask])
        return out

    evals = {
        d: Evaluator(prep, cfg.evaluation.spec(d).task(prep.loaded), progress=False)
        for d in cfg.evaluation.data
    }
    fp_ppl = {d: evaluate(ev.task, model, ev.reference())["ppl"] for d, ev in evals.items()}
    print("| palette | budget | bits | predicted (table) | matrices with column mixes | "
          + " | ".join(f"{d} ratio | {d} KL ± 1.96 se" for d in evals) + " |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|---|" * len(evals), flush=True)
    variants = {"main": base, "main + column mixes": base + labels}
    if args.only_cols:
        variants.pop("main")
    for budget in [float(b) for b in args.budgets.split(",")]:
        for label, specs in variants.items():
            choice = lagrange_plan(dmg, cost, specs, budget, total)
            pred = sum(dmg[n][s] for n, s in choice.items())
            used = sum(cost[n][s] for n, s in choice.items()) / total
            n_cols = sum(s in labels for s in choice.values())
            cells = held_out(model, choice, weight, evals, fp_ppl)
            print(f"| {label} | {budget} | {used:.3f} | {pred:.4f} | {n_cols} | "
                  + " | ".join(cells) + " |", flush=True)  # fmt: skip
            if n_cols:
                print("   ", Counter(choice.values()).most_common(8), flush=True)


if __name__ == "__main__":
    main()
