"""``mpq solve`` and ``mpq bounds``: a plan under a budget, the headroom of budgets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.cli.args import (
    SOLVER_NAMES,
    calib_spec,
    data_args,
    fill_recipe,
    model_args,
    parse_formats,
    precondition_arg,
    stats_task,
    table_data_args,
    ties_of,
)
from mpq.errors import MpqError
from mpq.files import check_writable
from mpq.registry import SEARCHES

if TYPE_CHECKING:
    from mpq.prepared import Prepared


def _latency(
    args: argparse.Namespace, prep: Prepared, formats: list, budget: dict[str, float]
) -> Any:
    """The ``[decisions, formats]`` seconds of ``--latency-table`` (None without one)."""
    if not args.latency_table:
        if "latency" in budget:
            raise MpqError(
                "a latency budget needs a measured table: run `mpq bench-layers --out T.json` "
                "and pass --latency-table T.json"
            )
        return None
    from mpq.latency import load_latency_costs

    return load_latency_costs(
        args.latency_table, prep.cost, formats, args.latency_backend, args.latency_batch
    )


def _check_plan_out(out: Path) -> None:
    """``solve --out``: a writable path that is new or already holds a plan (never another
    file silently overwritten)."""
    from mpq.plan import BitPlan

    check_writable(out, "--out")
    if out.is_file():
        try:
            BitPlan.load(out)
        except MpqError:
            raise MpqError(
                f"--out {str(out)!r} exists and is not a plan file; mpq only replaces its own "
                f"plans: choose another --out or remove the file"
            ) from None


def cmd_solve(args: argparse.Namespace) -> int:
    from mpq.cost import parse_budget
    from mpq.pipeline import damage_table, preconditioned, prepare, solve, task_for
    from mpq.sensitivity.table import SensitivityTable
    from mpq.solvers.options import SearchOptions

    _check_plan_out(Path(args.out))
    formats = parse_formats(fill_recipe(args))
    budget = parse_budget(args.budget)
    for name in ("trials", "generations", "rounds"):
        if getattr(args, name) < 1:
            raise MpqError(f"--{name} {getattr(args, name)} must be at least 1")
    if args.timesteps < 0:
        raise MpqError(f"--timesteps {args.timesteps} must be 0 (zero-shot) or more")
    if args.probes is not None and args.probes < 1:
        raise MpqError(f"--probes {args.probes} must be at least 1 (or left out: every decision)")
    prep = prepare(args.model, args.include, args.exclude, ties_of(args))
    prep = preconditioned(prep, args.precondition, calib_spec(args))
    calib = task_for(prep, args.data, args.split, args.n, args.seq_len, None)
    stats = stats_task(prep, args.stats) if args.stats else None
    table = None
    if args.table:
        table = SensitivityTable.load(args.table)
        if table.model_id != prep.loaded.model_id:
            raise MpqError(
                f"--table {args.table} was computed for model {table.model_id!r}, not "
                f"{prep.loaded.model_id!r}; compute it with `mpq sensitivity` on this model "
                f"(and the same --precondition)"
            )
    elif args.solver != "uniform":
        table = damage_table(prep, formats, calib, anchor=args.anchor, stats_task=stats)
    storage = None
    if args.solver == "bayes" and args.storage != "memory":
        from mpq.models import cache_root

        storage = args.storage or str(cache_root() / "optuna" / "studies.db")
        if "://" not in storage:
            Path(storage).parent.mkdir(parents=True, exist_ok=True)
    opts = SearchOptions(
        seed=args.seed,
        trials=args.trials,
        generations=args.generations,
        timesteps=args.timesteps,
        rounds=args.rounds,
        probes=args.probes,
        storage=storage,
        study=args.study,
    )
    guard = not args.no_guard and args.solver != "uniform"
    # The guard scores on the next calibration windows: neither the table nor a search saw them.
    unseen = task_for(prep, args.data, args.split, args.n, args.seq_len, None, offset=1)
    plan, sol = solve(
        prep,
        args.solver,
        formats,
        budget,
        table,
        calib=calib,
        search=opts,
        guard=guard,
        latency=_latency(args, prep, formats, budget),
        progress=args.solver in SEARCHES,
        guard_task=unseen if guard else None,
        stats_task=stats,
    )
    plan.save(args.out)
    cost = prep.cost.plan_cost(plan)
    print(
        f"{sol.solver}: {sol.status} in {sol.wall_time:.3f}s; effective bits "
        f"{cost.effective_bits:.4f}, model {cost.total_bytes:,} bytes; plan written to {args.out}"
    )
    if "guard_reason" in plan.meta:
        print(f"guard: {plan.meta['guard_reason']}")
    m = plan.meta
    if "uniform_below" in m or "uniform_above" in m:
        sides = ", ".join(
            f"uniform {m[f'uniform_{s}']} {m[f'measured_{s}']:.6g}"
            for s in ("below", "above")
            if f"uniform_{s}" in m
        )
        line = f"guard: unseen calibration tokens: plan {m.get('measured_mixed', float('nan')):.6g}"
        line += f"; {sides}"
        if "equal_quality" in m:
            line += (
                f"; uniform reaches its quality at {m['resource']}={m['equal_quality']:.4g} "
                f"({m['saved']:+.3g} against the plan)"
            )
        print(line)
    return 0


def cmd_bounds(args: argparse.Namespace) -> int:
    from mpq.cost import parse_budget, to_limit, to_user
    from mpq.pipeline import damage_table, prepare, task_for
    from mpq.problem import build_problem
    from mpq.solvers.bounds import headroom

    formats = parse_formats(args.formats)
    budgets = (
        [parse_budget(b) for b in args.budgets.split(";") if b.strip()] if args.budgets else []
    )
    resource = next(iter(budgets[0])) if budgets else "bits"
    if any(set(b) != {resource} for b in budgets):
        raise MpqError("--budgets must all use one resource, e.g. 'bits=3.5;bits=4.0'")
    prep = prepare(args.model, args.include, args.exclude, ties_of(args))
    calib = task_for(prep, args.data, args.split, args.n, args.seq_len, None)
    table = damage_table(prep, formats, calib)
    # The widest feasible budget: every decision at its most expensive candidate.
    problem = build_problem(prep.cost, formats, {}, table)
    limits = [to_limit(prep.cost, resource, b[resource]) for b in budgets] or None
    report = headroom(problem, resource, limits)

    def unit(r: str, v: float) -> float:
        return to_user(prep.cost, r, v)

    name = "bits per weight" if resource == "bits" else resource
    print(report.to_markdown(unit=unit, unit_name=name))
    return 0


def add_solve_parser(sub: Any) -> None:
    """Register ``solve`` on the ``mpq`` subcommands ``sub``."""
    p = sub.add_parser("solve", help="allocate bits under a budget and write a plan")
    model_args(p)
    p.add_argument("--solver", default="greedy", choices=SOLVER_NAMES)
    p.add_argument("--budget", required=True, help="e.g. 'bits=4.0', '4.0', 'bytes=80e6'")
    p.add_argument(
        "--formats",
        default=None,
        help="candidate formats, comma-separated (default: the model's recipe, mpq.recipes: "
        "SmolLM2's importance-weighted k-quant palette, else 3,4,5,6,8)",
    )
    p.add_argument("--out", required=True, help="where to write the plan JSON")
    p.add_argument(
        "--table",
        default=None,
        help="a sensitivity table JSON (`mpq sensitivity`); default: measured damage",
    )
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="skip the never-worse-than-uniform check (on the calibration windows after the "
        "table's: log ppl for language models)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of bayes / evolution / sac")
    p.add_argument("--trials", type=int, default=40, help="bayes: trials in the study")
    p.add_argument("--generations", type=int, default=10, help="evolution: generations")
    p.add_argument(
        "--timesteps",
        type=int,
        default=0,
        help="sac: fine-tuning steps on this problem (0: the shipped policy as is, zero-shot)",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="refine: rounds of coordinate descent on measured KL"
    )
    p.add_argument(
        "--probes",
        type=int,
        default=None,
        help="refine: probe only the N decisions whose table damage changes most per unit of "
        "cost (default: every decision; two measured plans per probe and round)",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="bayes: optuna storage (.db path or URL; 'memory'); default: "
        "$MPQ_CACHE/optuna/studies.db, so a killed search resumes",
    )
    p.add_argument("--study", default=None, help="bayes: study name (default: from the problem)")
    p.add_argument(
        "--latency-table", default=None, help="a `mpq bench-layers` table, for a latency= budget"
    )
    p.add_argument("--latency-backend", default="cpu", help="which backend's timings to use")
    p.add_argument("--latency-batch", type=int, default=1, help="which batch size's timings")
    precondition_arg(p)
    data_args(p, None, "calib", None, None)
    table_data_args(p)
    p.set_defaults(func=cmd_solve)


def add_bounds_parser(sub: Any) -> None:
    """Register ``bounds`` on the ``mpq`` subcommands ``sub``."""
    p = sub.add_parser("bounds", help="headroom: feasible budgets, uniform points, lower bounds")
    model_args(p)
    p.add_argument("--formats", default="3,4,5,6,8", help="candidate formats, comma-separated")
    p.add_argument("--budgets", default="", help="budgets for lower bounds, ';'-separated")
    data_args(p, "wiki", "calib", 2, 128)
    p.set_defaults(func=cmd_bounds)
