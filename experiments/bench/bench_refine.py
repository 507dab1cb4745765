"""refine on top of the ILP plan (SmolLM2-135M), on measured calibration KL.

1. A table of the demo's palette (3/4/5/6/8-bit per-channel asym, wiki calib 2 x 128 tokens):
   `--table measured` (the demo's measured-KL table, with the cached block path) or `fisher`
   (the default: cached in `$MPQ_CACHE` and cheap), timed.
2. At each budget: the ILP plan, then `refine` (1 round, the 40 decisions whose table damage
   changes most per unit of cost) on the calibration KL. For each plan: the table's additive
   prediction (sum of per-layer distortions: KL for the measured table, a predicted loss
   increase for Fisher), the measured calibration KL, the NLL on the next two calibration
   windows (unseen by table and search), and the refinement's cost.
3. Held-out wiki and bbc ppl (8 x 512 tokens) of the ILP and refined plans.

    MPQ_THREADS=1 PYTHONPATH=. python experiments/bench/bench_refine.py [--table measured]
        [--budgets 4.0]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mpq.calib_measure import evaluator_measure
from mpq.formats import QuantFormat
from mpq.pipeline import Evaluator, damage_table, prepare, sensitivity_table, task_for
from mpq.problem import build_problem, solution_to_plan
from mpq.sensitivity.gradient import Fisher
from mpq.solvers.ilp import solve_ilp
from mpq.solvers.refine import solve_refine

FORMATS = "3:asym,4:asym,5:asym,6:asym,8:asym"
HELD = 8  # held-out windows of 512 tokens per text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", choices=("fisher", "measured"), default="fisher")
    ap.add_argument("--budgets", default="3.5,4.0,4.5")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "1")))
    prep = prepare("smollm2-135m")
    formats = [QuantFormat.parse(s) for s in FORMATS.split(",")]
    calib = task_for(prep, "wiki", "calib", 2, 128, 2)
    unseen = Evaluator(prep, task_for(prep, "wiki", "calib", 2, 128, 2, offset=1), progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    if args.table == "measured":
        table = damage_table(prep, formats, calib, progress=False)
    else:
        table = sensitivity_table(prep, Fisher(), formats, calib, progress=False)
    print(
        f"{args.table} table: {time.perf_counter() - t0:.0f} s wall, "
        f"{time.process_time() - c0:.0f} s CPU (0 when cached)",
        flush=True,
    )
    print(
        "\n| budget | plan | bits | predicted (additive) | measured calib KL "
        "| unseen NLL | evaluations | refine s |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    plans = {}
    for b in budgets:
        problem = build_problem(prep.cost, formats, {"bits": b}, table)
        measure = evaluator_measure(
            Evaluator(prep, calib, progress=False), problem, formats, stats_task=calib
        )
        ilp = solve_ilp(problem)
        t1 = time.perf_counter()
        ref = solve_refine(problem, measure, rounds=1, candidates=40)
        seconds = time.perf_counter() - t1
        for name, sol in (("ilp", ilp), ("refine", ref)):
            plan = solution_to_plan(problem, sol, prep.cost, formats, objective=table.estimator)
            plans[f"{name}@{b}"] = plan
            nll = unseen(plan)[0]["nll"]
            kl = measure(np.asarray(sol.choice))
            extra = f"{ref.stats['evaluations']} | {seconds:.0f}" if name == "refine" else "- | -"
            print(
                f"| {b} | {name} | {prep.cost.plan_cost(plan).effective_bits:.3f} | "
                f"{problem.distortion_of(np.asarray(sol.choice)):.4f} | {kl:.4f} | {nll:.4f} "
                f"| {extra} |",
                flush=True,
            )
    for data in ("wiki", "bbc"):
        held = Evaluator(prep, task_for(prep, data, "heldout", HELD, 512, 1), progress=False)
        print(f"\n{data} held-out ({HELD} x 512 tokens)\n\n| plan | ppl [95% CI] |\n|---|---|")
        for name, plan in plans.items():
            r, _ = held(plan)
            print(f"| {name} | {r['ppl']:.2f} [{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}] |", flush=True)


if __name__ == "__main__":
    main()
