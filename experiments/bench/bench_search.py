"""Benchmark the searches (SAC, optuna-TPE, evolution) against the exact ILP, on one machine.

The problem: 100 decisions x 6 options (2, 3, 4, 5, 6, 8 bits), one budgeted resource (stored
bits: size x (bits + 0.25)), seeded, distortions from the usual error model (sensitivity x
size x 4^-bits, +-20% noise), the budget halfway between the least and the largest use.

Two objectives:

- **table**: the searches minimize the table's own summed distortion, so the ILP optimum is the
  reference. The searches that start from the table's plans (TPE with its enqueued start
  trials, evolution from the ILP plan) start *at* the optimum here, so the informative rows
  are the ones that do not: TPE with ``start=False``, evolution from the greedy plan, SAC.
- **measured**: the searches minimize a hidden "true" table (the table x lognormal(0, 0.5)
  per entry), standing for measured calibration quality that the additive table only
  approximates. The reference is the ILP on the hidden table (unreachable in practice); the
  ILP plan of the visible table is the baseline the searches should improve on.

Gap = objective / reference - 1. Wall time is the whole call (SAC: training included).
Writes Markdown to stdout; paste it into BENCHMARKS.md with the machine and the date.

    python experiments/bench/bench_search.py [--decisions 100] [--options 6] [--seed 0]
        [--trials 300] [--generations 60] [--timesteps 20000]
        [--table TABLE.json --model smollm2-135m --budget bits=4.0 [--table-only]]

``--table``: also run the table objective on a real SensitivityTable JSON (with the model it
was measured on, for the cost model; loads the model, so torch is imported).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np

from mpq.solvers.base import AllocationProblem, Solution
from mpq.solvers.bayes import solve_bayes
from mpq.solvers.evolution import solve_evolution
from mpq.solvers.greedy import solve_greedy
from mpq.solvers.ilp import solve_ilp
from mpq.solvers.sac import solve_sac

BITS = np.array([2, 3, 4, 5, 6, 8, 12, 16], float)


def make_problem(n: int, m: int, seed: int) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    bits = BITS[:m]
    size = rng.integers(1000, 100000, n).astype(float)
    costs = {"bits": np.round(size[:, None] * (bits + 0.25))}
    dist = rng.uniform(0.1, 10, n)[:, None] * size[:, None] * 4.0**-bits
    dist *= rng.uniform(0.8, 1.2, (n, m))
    c = costs["bits"]
    limits = {"bits": float(c.min(1).sum() + 0.5 * (c.max(1).sum() - c.min(1).sum()))}
    return AllocationProblem(
        tuple(f"d{i}" for i in range(n)), tuple(f"{b:g}" for b in bits), dist, costs, limits
    )


def hidden_measure(problem: AllocationProblem, seed: int) -> tuple[np.ndarray, Callable]:
    rng = np.random.default_rng(seed + 1000)
    true = problem.distortion * np.exp(rng.normal(0.0, 0.5, problem.distortion.shape))
    idx = np.arange(len(problem.decisions))

    def measure(choice: np.ndarray) -> float:
        return float(true[idx, choice].sum())

    return true, measure


Row = tuple[str, str, str, str, str]


def run(
    label: str, call: Callable[[], Solution], value: Callable[[Solution], float], ref: float
) -> Row:
    t = time.perf_counter()
    sol = call()
    wall = time.perf_counter() - t
    v = value(sol)
    extra = []
    for key in ("trials", "measure_calls", "timesteps", "source", "clamped"):
        if key in sol.stats:
            extra.append(f"{key} {sol.stats[key]}")
    return (label, f"{v:.6g}", f"{100 * (v / ref - 1):.3f}%", f"{wall:.2f}", ", ".join(extra))


def table_rows(p: AllocationProblem, args: argparse.Namespace) -> list[Row]:
    t = time.perf_counter()
    ilp = solve_ilp(p)
    t_ilp = time.perf_counter() - t
    opt = ilp.objective
    greedy = solve_greedy(p)

    def obj(s: Solution) -> float:
        return s.objective

    rows: list[Row] = [("ilp (HiGHS): the optimum", f"{opt:.6g}", "0", f"{t_ilp:.2f}", "")]
    rows.append(
        (
            "greedy",
            f"{greedy.objective:.6g}",
            f"{100 * (greedy.objective / opt - 1):.3f}%",
            f"{greedy.wall_time:.2f}",
            "",
        )
    )
    rows.append(
        run(
            f"sac ({args.timesteps} steps)",
            lambda: solve_sac(p, total_timesteps=args.timesteps, seed=args.seed),
            obj,
            opt,
        )
    )
    rows.append(
        run(
            f"optuna-TPE, start=False ({args.trials} trials)",
            lambda: solve_bayes(p, n_trials=args.trials, seed=args.seed, start=False),
            obj,
            opt,
        )
    )
    rows.append(
        run(
            f"optuna-TPE from ilp/greedy/uniform ({args.trials} trials)",
            lambda: solve_bayes(p, n_trials=args.trials, seed=args.seed),
            obj,
            opt,
        )
    )
    rows.append(
        run(
            f"evolution from greedy ({args.generations} generations)",
            lambda: solve_evolution(
                p, start=greedy.choice, generations=args.generations, seed=args.seed
            ),
            obj,
            opt,
        )
    )
    return rows


def measured_rows(p: AllocationProblem, args: argparse.Namespace) -> list[Row]:
    true, measure = hidden_measure(p, args.seed)
    hidden = AllocationProblem(p.decisions, p.options, true, p.costs, p.limits)
    ref = solve_ilp(hidden).objective

    def val(s: Solution) -> float:
        return measure(s.choice)

    rows: list[Row] = [
        ("ilp on the hidden table (unreachable reference)", f"{ref:.6g}", "0", "", "")
    ]
    rows.append(run("ilp on the visible table (baseline)", lambda: solve_ilp(p), val, ref))
    rows.append(
        run(
            f"sac on the measure ({args.timesteps} steps)",
            lambda: solve_sac(p, measure, total_timesteps=args.timesteps, seed=args.seed),
            val,
            ref,
        )
    )
    rows.append(
        run(
            f"sac on the measure, unshaped ({args.timesteps} steps)",
            lambda: solve_sac(
                p, measure, total_timesteps=args.timesteps, seed=args.seed, shaped=False
            ),
            val,
            ref,
        )
    )
    rows.append(
        run(
            f"optuna-TPE from ilp/greedy/uniform ({args.trials} trials)",
            lambda: solve_bayes(p, measure, n_trials=args.trials, seed=args.seed),
            val,
            ref,
        )
    )
    rows.append(
        run(
            f"evolution from ilp ({args.generations} generations)",
            lambda: solve_evolution(p, measure, generations=args.generations, seed=args.seed),
            val,
            ref,
        )
    )
    return rows


def real_problem(args: argparse.Namespace) -> AllocationProblem:
    from mpq.formats import QuantFormat
    from mpq.pipeline import prepare
    from mpq.problem import build_problem, parse_budget
    from mpq.sensitivity.table import SensitivityTable

    table = SensitivityTable.load(args.table)
    specs = sorted({s for row in table.distortions.values() for s in row})
    formats = [QuantFormat.parse(s) for s in specs]
    prep = prepare(args.model)
    return build_problem(prep.cost, formats, parse_budget(args.budget), table)


def table_md(rows: list[Row], head: str) -> None:
    print(f"| {head} | objective | gap | wall s | notes |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def start_counts(args: argparse.Namespace) -> None:
    """How often the searches' best plan is one of their start plans, at the settings
    `mpq compare` runs them with (bayes 40 trials, evolution 10 x 8), over ``--starts``
    seeded problems with a hidden measure (the table x lognormal(0, 0.5) per entry)."""
    from mpq.solvers.evolution import solve_evolution

    rows = {"bayes (TPE, 40 trials)": [], "evolution (10 x 8 from the ILP plan)": []}
    for seed in range(args.starts):
        p = make_problem(args.decisions, args.options, seed)
        _, measure = hidden_measure(p, seed)
        start = measure(solve_ilp(p).choice)
        b = solve_bayes(p, measure, n_trials=40, seed=seed)
        e = solve_evolution(p, measure, generations=10, offspring=8, seed=seed)
        rows["bayes (TPE, 40 trials)"].append(
            (b.stats["start"] != "search", b.stats["measured"] / start - 1)
        )
        rows["evolution (10 x 8 from the ILP plan)"].append(
            (not e.stats["improved"], e.stats["measured"] / start - 1)
        )
    print(
        f"Best plan = a start plan, over {args.starts} problems ({args.decisions} decisions x "
        f"{args.options} options, hidden measure = table x lognormal(0, 0.5)):"
    )
    print()
    print("| search | best is a start plan | measured vs the ILP plan, mean | best |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        same = sum(x for x, _ in r)
        gains = [g for _, g in r]
        print(f"| {name} | {same} / {len(r)} | {np.mean(gains):+.2%} | {min(gains):+.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--decisions", type=int, default=100)
    ap.add_argument("--options", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--generations", type=int, default=60)
    ap.add_argument("--timesteps", type=int, default=20000)
    ap.add_argument("--table", default=None, help="a SensitivityTable JSON (optional)")
    ap.add_argument("--model", default="smollm2-135m", help="the model of --table")
    ap.add_argument("--budget", default="bits=4.0", help="budget for --table")
    ap.add_argument("--table-only", action="store_true", help="skip the synthetic problem")
    ap.add_argument(
        "--starts",
        type=int,
        default=0,
        help="only count how often bayes/evolution end on a start plan, N problems",
    )
    args = ap.parse_args()
    if args.starts:
        start_counts(args)
        return
    import torch

    torch.set_num_threads(1)
    p = make_problem(args.decisions, args.options, args.seed)
    # Warm up: imports (scipy, optuna, stable-baselines3) are not part of any timing.
    warm = make_problem(6, args.options, args.seed)
    solve_ilp(warm)
    solve_bayes(warm, n_trials=2)
    solve_sac(warm, total_timesteps=8, learning_starts=4)
    print(
        f"Machine: {platform.node()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads 1), Python {platform.python_version()}, "
        f"optuna {version('optuna')}, stable-baselines3 {version('stable-baselines3')}, "
        f"torch {version('torch')}, scipy {version('scipy')}, numpy {version('numpy')}"
    )
    if not args.table_only:
        print(
            f"Problem: {args.decisions} decisions x {args.options} options, budget on bits "
            f"halfway, seed {args.seed}"
        )
        print()
        print("Objective = the table's summed distortion; gap to the ILP optimum:")
        print()
        table_md(table_rows(p, args), "solver")
        print(
            "Objective = a hidden table (visible x lognormal(0, 0.5)) seen only through a "
            "measure; gap to the ILP on the hidden table:"
        )
        print()
        table_md(measured_rows(p, args), "solver")
    if args.table:
        q = real_problem(args)
        print(
            f"Real table {args.table} ({len(q.decisions)} decisions x {len(q.options)} "
            f"options, {args.budget}); gap to the ILP optimum:"
        )
        print()
        table_md(table_rows(q, args), "solver")


if __name__ == "__main__":
    main()
