"""The SAC agent against the exact ILP on real sensitivity tables, side by side in one run.

For each (model, table, budgets): the ILP optimum of the table (the reference), the water level
alone (action 0 at every step: the LP relaxation's price, no learned policy), the shipped
policy zero-shot (``mpq/solvers/policies/sac_policy_v2.safetensors``; MiniLM's and
MobileNetV2's tables were never trained on) and, with ``--timesteps N``, the shipped policy
fine-tuned N steps on that table and budget. Gap = table objective / ILP optimum - 1.

    nice -n 10 python experiments/bench/bench_sac.py \
        --case smollm2-135m=experiments/results/sac-tables/smollm2_fisher.json@3.5,4.0,4.5 \
        --case minilm-l6=experiments/results/sac-tables/minilm_fisher.json@2.5,3.0,3.5 \
        --case mobilenet-v2=experiments/results/sac-tables/mobilenet_fisher.json@4.5,5.0,6.0 \
        [--timesteps 2000]
"""

from __future__ import annotations

import argparse
import time

from train_sac_policy import table_problem

from mpq.solvers.ilp import solve_ilp
from mpq.solvers.sac import level_plan, load_policy, solve_sac


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", required=True, help="MODEL=TABLE.json@BITS,...")
    ap.add_argument("--timesteps", type=int, default=0)
    args = ap.parse_args()
    meta = load_policy().meta
    print(f"shipped policy: {meta.get('name')} v{meta.get('version')}, "
          f"{meta.get('trained_by')}, on {meta.get('trained_on')} "
          f"({meta.get('train_minutes')} min), kept {meta.get('kept_stage')}")
    print()
    head = ("| model | bits | decisions | ILP optimum | ILP s | water level gap "
            "| sac zero-shot gap | s")
    if args.timesteps:
        head += f" | sac fine-tuned {args.timesteps} steps gap | s"
    print(head + " |")
    print("|" + "---|" * head.count("|"))
    for case in args.case:
        model_id, rest = case.split("=", 1)
        path, budgets = rest.rsplit("@", 1)
        for bits in (float(b) for b in budgets.split(",")):
            p = table_problem(model_id, path, bits)
            t = time.perf_counter()
            ilp = solve_ilp(p)
            t_ilp = time.perf_counter() - t
            opt = ilp.objective
            level = p.distortion_of(level_plan(p)) / opt - 1
            t = time.perf_counter()
            zero = solve_sac(p)
            t_zero = time.perf_counter() - t
            row = (f"| {model_id} | {bits:g} | {len(p.decisions)} | {opt:.6g} | {t_ilp:.2f} "
                   f"| {level:.3%} | {zero.objective / opt - 1:.3%} | {t_zero:.2f}")
            if args.timesteps:
                t = time.perf_counter()
                tuned = solve_sac(p, total_timesteps=args.timesteps, seed=0)
                row += f" | {tuned.objective / opt - 1:.3%} | {time.perf_counter() - t:.1f}"
            print(row + " |", flush=True)


if __name__ == "__main__":
    main()
