"""The SAC agent against the exact ILP on real sensitivity tables, side by side in one run.

For each (model, table, budgets): the ILP optimum of the table (the reference), the water level
alone (action 0 at every step: the LP relaxation's price, no learned policy), the same with the
lump rounded first (``rounding=True``: the LP's fractional step fixed at its better side when it
is a large decision's), the shipped policy's own plan, and ``solve_sac`` zero-shot (the better
of the policy's plan and both levels; ``mpq/solvers/policies/``; MiniLM's and MobileNetV2's
tables were never trained on) and, with ``--timesteps N``, the shipped policy
fine-tuned N steps on that table and budget. Gap = table objective / ILP optimum - 1.

    nice -n 10 python experiments/bench/bench_sac.py \
        --case smollm2-135m=experiments/results/sac-tables/smollm2_fisher.json@3.5,4.0,4.5 \
        --case minilm-l6=experiments/results/sac-tables/minilm_fisher.json@2.5,3.0,3.5 \
        --case mobilenet-v2=experiments/results/sac-tables/mobilenet_fisher.json@4.5,5.0,6.0 \
        [--timesteps 2000] [--held-out 10]

``--held-out N``: also N synthetic and N lumpy synthetic tables (``train_sac_policy.py``'s
generators, seeds 9000.. and 9500.., never used in training, validation or choosing
``LUMP_RATIO``) at 3 budgets each, and 2N six-decision suite problems (seeds 30000..), with
the same columns as means over the group.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from train_sac_policy import small, synthetic, table_problem, with_budget

from mpq.solvers.ilp import solve_ilp
from mpq.solvers.sac import NumpyActor, level_plan, load_policy, policy_plan, solve_sac


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", required=True, help="MODEL=TABLE.json@BITS,...")
    ap.add_argument("--timesteps", type=int, default=0)
    ap.add_argument("--held-out", type=int, default=0)
    args = ap.parse_args()
    actor = load_policy()
    meta = actor.meta
    print(
        f"shipped policy: {meta.get('name')} v{meta.get('version')}, "
        f"{meta.get('trained_by')}, on {meta.get('trained_on')} "
        f"({meta.get('train_minutes')} min), kept {meta.get('kept_stage')}"
    )
    print()
    head = (
        "| model | bits | decisions | ILP optimum | ILP s | water level gap "
        "| rounded level gap | policy alone gap | sac zero-shot gap | source | s"
    )
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
            rounded = p.distortion_of(level_plan(p, rounding=True)) / opt - 1
            alone = p.distortion_of(policy_plan(actor, p)[0]) / opt - 1
            t = time.perf_counter()
            zero = solve_sac(p)
            t_zero = time.perf_counter() - t
            row = (
                f"| {model_id} | {bits:g} | {len(p.decisions)} | {opt:.6g} | {t_ilp:.2f} "
                f"| {level:.3%} | {rounded:.3%} | {alone:.3%} | {zero.objective / opt - 1:.3%} "
                f"| {zero.stats['source']} | {t_zero:.2f}"
            )
            if args.timesteps:
                t = time.perf_counter()
                tuned = solve_sac(p, total_timesteps=args.timesteps, seed=0)
                row += f" | {tuned.objective / opt - 1:.3%} | {time.perf_counter() - t:.1f}"
            print(row + " |", flush=True)
    if args.held_out:
        held_out(actor, args.held_out)


def held_out(actor: NumpyActor, n: int) -> None:
    """Mean (max) gaps over held-out synthetic groups; 'better / worse': the rounded level
    against the plain one."""
    groups = {
        "synthetic, 3 budgets": [
            with_budget(synthetic(9000 + i), f) for i in range(n) for f in (0.25, 0.5, 0.75)
        ],
        "lumpy synthetic, 3 budgets": [
            with_budget(synthetic(9500 + i, lumpy=True), f)
            for i in range(n)
            for f in (0.25, 0.5, 0.75)
        ],
        "suite, 6 decisions, 1 or 3 resources": [small(30_000 + i) for i in range(2 * n)],
    }
    print()
    print(
        "| held-out group | problems | water level | rounded level | rounded better / worse "
        "| policy alone | sac zero-shot |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, problems in groups.items():
        rows = []
        for p in problems:
            opt = solve_ilp(p).objective
            rows.append(
                [
                    p.distortion_of(level_plan(p)) / opt - 1,
                    p.distortion_of(level_plan(p, rounding=True)) / opt - 1,
                    p.distortion_of(policy_plan(actor, p)[0]) / opt - 1,
                    solve_sac(p).objective / opt - 1,
                ]
            )
        g = np.array(rows)
        better = int(np.sum(g[:, 1] < g[:, 0] - 1e-12))
        worse = int(np.sum(g[:, 1] > g[:, 0] + 1e-12))
        cells = [f"{m:.3%} (max {x:.2%})" for m, x in zip(g.mean(0), g.max(0), strict=True)]
        print(
            f"| {name} | {len(problems)} | {cells[0]} | {cells[1]} | {better} / {worse} "
            f"| {cells[2]} | {cells[3]} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
