"""Does the guard on unseen calibration tokens see what held-out text sees? (SmolLM2-135M)

ILP plans of the demo's palette (3/4/5/6/8-bit per-channel asym) at 3.5 / 4.0 / 4.5 bits on a
Fisher table (wiki calib, 2 x 128 tokens), each solved with the guard on the next two calibration
windows (256 tokens neither the table nor the solver used). Then every ILP plan and every uniform
plan of 3 to 5 bits is evaluated on held-out wiki and bbc (8 x 512 tokens each: the 2-core VM
was shared by six jobs), and the bits at equal
quality (uniform curve interpolated in log ppl) are computed there too, side by side with the
guard's estimate. Prints Markdown tables. Usage:

    MPQ_THREADS=1 PYTHONPATH=. python experiments/bench/bench_guard.py
"""

from __future__ import annotations

import math
import os
import time

import torch

from mpq.formats import QuantFormat
from mpq.pipeline import Evaluator, prepare, sensitivity_table, solve, task_for, uniform_plans
from mpq.sensitivity.gradient import Fisher
from mpq.solvers.guard import UniformPoint, equal_quality_use

FORMATS = "3:asym,4:asym,5:asym,6:asym,8:asym"
BUDGETS = (3.5, 4.0, 4.5)
HELD = 8  # held-out windows of 512 tokens per text


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "1")))
    prep = prepare("smollm2-135m")
    formats = [QuantFormat.parse(s) for s in FORMATS.split(",")]
    calib = task_for(prep, "wiki", "calib", 2, 128, 2)
    unseen = task_for(prep, "wiki", "calib", 2, 128, 2, offset=1)
    t0 = time.perf_counter()
    table = sensitivity_table(prep, Fisher(), formats, calib, progress=False)
    print(f"Fisher table: {time.perf_counter() - t0:.1f} s (cached when 0)")
    plans = {}
    print(
        "\n| budget | guard | plan bits | unseen NLL plan | uniform below | uniform above "
        "| uniform bits at equal unseen NLL | saved (unseen) | guard s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in BUDGETS:
        t1 = time.perf_counter()
        raw, _ = solve(prep, "ilp", formats, {"bits": b}, table, calib=calib)
        guarded, _ = solve(
            prep, "ilp", formats, {"bits": b}, table, calib=calib, guard=True, guard_task=unseen
        )
        m = guarded.meta
        plans[f"ilp@{b}"] = raw
        bits = prep.cost.plan_cost(raw).effective_bits
        print(
            f"| {b} | {m['guard']} | {bits:.3f} | {m.get('measured_mixed', math.nan):.4f} | "
            f"{m.get('uniform_below', '-')} {m.get('measured_below', math.nan):.4f} | "
            f"{m.get('uniform_above', '-')} {m.get('measured_above', math.nan):.4f} | "
            f"{m.get('equal_quality', math.nan):.3f} | {m.get('saved', math.nan):+.3f} | "
            f"{time.perf_counter() - t1:.0f} |"
        )
    for data in ("wiki", "bbc"):
        held = Evaluator(prep, task_for(prep, data, "heldout", HELD, 512, 1), progress=False)
        rows = []
        for plan in uniform_plans(prep, formats[:3]):
            r, _ = held(plan)
            rows.append((f"uniform:{next(iter(plan.formats.values())).spec()}", plan, r))
        for name, plan in plans.items():
            r, _ = held(plan)
            rows.append((name, plan, r))
        curve = [
            UniformPoint(n, prep.cost.plan_cost(p).effective_bits, math.log(r["ppl"]))
            for n, p, r in rows
            if n.startswith("uniform")
        ]
        print(f"\n{data} held-out ({HELD} x 512 tokens)\n")
        print("| plan | bits | ppl [95% CI] | uniform bits at equal ppl | saved |")
        print("|---|---|---|---|---|")
        for n, p, r in rows:
            bits = prep.cost.plan_cost(p).effective_bits
            eq = equal_quality_use(curve, math.log(r["ppl"])) if n.startswith("ilp") else math.nan
            print(
                f"| {n} | {bits:.3f} | {r['ppl']:.2f} [{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}] | "
                f"{eq:.3f} | {eq - bits:+.3f} |"
            )


if __name__ == "__main__":
    main()
