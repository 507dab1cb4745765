"""The `mpq` command: the only place where names map to solvers, models and formats.

Bad input exits with status 2 and one ``error:`` line that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.errors import MpqError
from mpq.files import check_writable
from mpq.registry import ESTIMATORS, MODELS, SEARCHES, solver_names

if TYPE_CHECKING:
    from mpq.prepared import Prepared
    from mpq.tasks import CalibSpec

# Every --solver name: the registry's table solvers and searches (torch-free).
SOLVER_NAMES = solver_names()


def model_args(p: argparse.ArgumentParser) -> None:
    """--model, --include, --exclude, --no-ties (every command that prepares a model)."""
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help=f"bundled id ({', '.join(MODELS)}) or a local HF folder",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="REGEX",
        help="only targets whose name matches (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="REGEX",
        help="skip targets whose name matches (repeatable; default: the model's own)",
    )
    p.add_argument(
        "--no-ties",
        action="store_true",
        help="do not tie q/k/v and gate/up projections to one format",
    )


def _common_data(
    p: argparse.ArgumentParser, default: str, split: str, n: int, seq: int | None
) -> None:
    p.add_argument("--data", default=default, help="wiki | bbc (text), photos (CNN)")
    p.add_argument("--split", default=split, help="calib | heldout")
    p.add_argument("--n", type=int, default=n, help="windows / documents / images")
    p.add_argument("--seq-len", type=int, default=seq, help="tokens per window")


def _precondition_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precondition",
        default="none",
        metavar="SPEC",
        help="equivalence transform before quantizing: none, scale_folding[:alpha=0.5], "
        "awq[:fmt=3:asym] (fitted on the calibration data; recorded in the plan)",
    )


def _calib(args: argparse.Namespace) -> CalibSpec:
    from mpq.tasks import CalibSpec

    return CalibSpec(args.data, args.split, args.n, args.seq_len, getattr(args, "batch_size", None))


def _formats(text: str) -> list:
    from mpq.formats import QuantFormat

    return [QuantFormat.parse(s) for s in text.split(",") if s.strip()]


def cmd_inspect(args: argparse.Namespace) -> int:
    from mpq.formats import KEEP
    from mpq.pipeline import prepare
    from mpq.plan import uniform_plan

    prep = prepare(args.model, args.include, args.exclude, not args.no_ties)
    rows = []
    for t in prep.targets:
        macs = prep.cost.macs[t.name] if prep.cost.macs else 0
        alias = f" (also {', '.join(t.aliases)})" if t.aliases else ""
        rows.append(
            f"{t.name:<48} {t.kind:<9} {str(list(t.shape)):<16} {macs:>12,} {t.tie or '-'}{alias}"
        )
    keep = prep.cost.plan_cost(uniform_plan(prep.targets, KEEP, prep.loaded.model_id))
    print(f"{'target':<48} {'kind':<9} {'shape':<16} {'MACs/sample':>12} tie group")
    print("\n".join(rows))
    ties = {t.tie for t in prep.targets if t.tie}
    print(
        f"\n{len(prep.targets)} targets, {len(ties)} tie groups, "
        f"{prep.cost.target_numel:,} target weights of {prep.cost.model_numel:,} model values.\n"
        f"fp32 model: {prep.cost.fp_report().total_bytes:,} bytes; targets kept at fp16: "
        f"{keep.total_bytes:,} bytes; fixed (non-target) tensors: "
        f"{prep.cost.fixed_bytes:,} bytes."
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mpq.pipeline import Evaluator, prepare, prepared_for_plan, task_for
    from mpq.plan import parse_plan_arg

    prep = prepare(args.model, args.include, args.exclude, not args.no_ties)
    plan = (
        None if args.plan == "fp" else parse_plan_arg(args.plan, prep.targets, prep.loaded.model_id)
    )
    if plan is not None:
        prep = prepared_for_plan(prep, plan)  # the plan's recorded transform, re-applied
        plan = _with_stats(prep, plan, args.stats)
    task = task_for(prep, args.data, args.split, args.n, args.seq_len, None)
    result, seconds = Evaluator(prep, task)(plan, label=args.plan)
    out: dict[str, Any] = dict(result.metrics)
    if plan is not None:
        out.update(prep.cost.plan_cost(plan).summary())
        out["precondition"] = prep.precondition.method
    out["seconds"] = seconds
    print(json.dumps(out, indent=1))
    return 0


def _with_stats(prep: Prepared, plan: Any, spec: str | None) -> Any:
    """``plan`` with ``--stats DATA:SPLIT:NxLEN`` recorded as the data of its mse/gptq formats."""
    if spec is None:
        return plan
    from mpq.pipeline import task_for
    from mpq.planstats import META_KEY, uses_stats, with_record

    parts = spec.split(":")
    shape = parts[2].split("x") if len(parts) == 3 else []
    if len(parts) != 3 or len(shape) != 2 or not all(p.isdigit() for p in shape):
        raise MpqError(f"--stats {spec!r}: expected DATA:SPLIT:NxLEN, e.g. wiki:calib:32x512")
    if parts[1] not in ("calib", "train"):
        raise MpqError(f"--stats {spec!r}: statistics come from calibration data, not {parts[1]!r}")
    if not uses_stats(plan):
        raise MpqError("--stats applies to plans with mse or gptq formats; this plan has none")
    if META_KEY in plan.meta:
        raise MpqError("the plan already records its statistics data; drop --stats")
    task = task_for(prep, parts[0], parts[1], int(shape[0]), int(shape[1]), None)
    return with_record(plan, task)


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
    formats = _formats(args.formats)
    budget = parse_budget(args.budget)
    for name in ("trials", "generations", "rounds"):
        if getattr(args, name) < 1:
            raise MpqError(f"--{name} {getattr(args, name)} must be at least 1")
    if args.timesteps < 0:
        raise MpqError(f"--timesteps {args.timesteps} must be 0 (zero-shot) or more")
    prep = prepare(args.model, args.include, args.exclude, not args.no_ties)
    prep = preconditioned(prep, args.precondition, _calib(args))
    calib = task_for(prep, args.data, args.split, args.n, args.seq_len, None)
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
        table = damage_table(prep, formats, calib)
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


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from mpq.pipeline import preconditioned, prepare, sensitivity_table, task_for
    from mpq.sensitivity.runner import make_estimator, parse_params

    check_writable(Path(args.out), "--out")
    estimator = make_estimator(args.estimator, parse_params(args.param))
    formats = _formats(args.formats)
    prep = prepare(args.model, args.include, args.exclude, not args.no_ties)
    prep = preconditioned(prep, args.precondition, _calib(args))
    calib = task_for(prep, args.data, args.split, args.n, args.seq_len, args.batch_size)
    t0 = time.perf_counter()
    table = sensitivity_table(prep, estimator, formats, calib)
    table.save(args.out)
    print(
        f"{table.estimator}: {len(table.scores)} targets in {time.perf_counter() - t0:.0f} s; "
        f"table written to {args.out}"
    )
    return 0


def cmd_plot_sensitivity(args: argparse.Namespace) -> int:
    from mpq.sensitivity.plot import plot_sensitivity
    from mpq.sensitivity.table import SensitivityTable

    print(f"plot written to {plot_sensitivity(SensitivityTable.load(args.table), args.out)}")
    return 0


def cmd_bounds(args: argparse.Namespace) -> int:
    from mpq.cost import parse_budget, to_limit, to_user
    from mpq.pipeline import damage_table, prepare, task_for
    from mpq.problem import build_problem
    from mpq.solvers.bounds import headroom

    formats = _formats(args.formats)
    budgets = (
        [parse_budget(b) for b in args.budgets.split(";") if b.strip()] if args.budgets else []
    )
    resource = next(iter(budgets[0])) if budgets else "bits"
    if any(set(b) != {resource} for b in budgets):
        raise MpqError("--budgets must all use one resource, e.g. 'bits=3.5;bits=4.0'")
    prep = prepare(args.model, args.include, args.exclude, not args.no_ties)
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


def cmd_compare(args: argparse.Namespace) -> int:
    from mpq.compare import run_compare
    from mpq.config import load_config

    cfg = load_config(args.config)
    t0 = time.perf_counter()
    folder = run_compare(cfg, Path(args.out))
    print(f"report: {folder / 'report.md'}  ({time.perf_counter() - t0:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list targets, shapes, tie groups and fp bytes")
    model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="evaluate a plan (or fp) on held-out data")
    model_args(p)
    p.add_argument(
        "--plan", required=True, help="plan JSON file, 'uniform:4', 'uniform:4:g128:asym', or 'fp'"
    )
    _common_data(p, "wiki", "heldout", 8, None)
    p.add_argument(
        "--stats",
        default=None,
        metavar="DATA:SPLIT:NxLEN",
        help="calibration data of the plan's mse/gptq formats (importance, Hessians), e.g. "
        "wiki:calib:32x512; default: what the plan records (mse unweighted if nothing)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("solve", help="allocate bits under a budget and write a plan")
    model_args(p)
    p.add_argument("--solver", default="greedy", choices=SOLVER_NAMES)
    p.add_argument("--budget", required=True, help="e.g. 'bits=4.0', '4.0', 'bytes=80e6'")
    p.add_argument("--formats", default="3,4,5,6,8", help="candidate formats, comma-separated")
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
    _precondition_arg(p)
    _common_data(p, "wiki", "calib", 2, 128)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("sensitivity", help="score every target with one estimator; write a table")
    model_args(p)
    p.add_argument("--estimator", required=True, choices=sorted(ESTIMATORS))
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="estimator parameter, e.g. tol=0.05 (repeatable)")  # fmt: skip
    p.add_argument("--formats", default="3,4,5,6,8", help="candidate formats, comma-separated")
    p.add_argument("--batch-size", type=int, default=None, help="calibration batch size")
    p.add_argument("--out", required=True, help="where to write the table JSON")
    _precondition_arg(p)
    _common_data(p, "wiki", "calib", 2, 128)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("plot-sensitivity", help="plot a table's per-layer scores by depth (PNG)")
    p.add_argument("table", help="a sensitivity table JSON (from `mpq sensitivity`)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_plot_sensitivity)

    p = sub.add_parser("bounds", help="headroom: feasible budgets, uniform points, lower bounds")
    model_args(p)
    p.add_argument("--formats", default="3,4,5,6,8", help="candidate formats, comma-separated")
    p.add_argument("--budgets", default="", help="budgets for lower bounds, ';'-separated")
    _common_data(p, "wiki", "calib", 2, 128)
    p.set_defaults(func=cmd_bounds)

    p = sub.add_parser("compare", help="run a comparison config and write a report")
    p.add_argument(
        "--config", required=True, help="TOML file, e.g. experiments/configs/smollm2.toml"
    )
    p.add_argument("--out", default="reports", help="folder for reports/<name>/")
    p.set_defaults(func=cmd_compare)

    from mpq.export.command import add_export_parser
    from mpq.latency_cli import add_bench_layers_parser

    add_export_parser(sub, SOLVER_NAMES)
    add_bench_layers_parser(sub, model_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        import torch

        torch.set_num_threads(_threads())
        return int(args.func(args))
    except MpqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted (Ctrl-C); finished results are kept (cache entries, written "
            "files) and nothing half-written was left: rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:  # a file system refusal (permissions, full disk, missing folder)
        where = f" {exc.filename!r}" if exc.filename else ""
        print(
            f"error: cannot access{where}: {exc.strerror or exc}; check the path, its "
            f"permissions and free space",
            file=sys.stderr,
        )
        return 2


def _threads() -> int:
    text = os.environ.get("MPQ_THREADS", "")
    if not text:
        return os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise MpqError(f"MPQ_THREADS={text!r} is not a number; set it to e.g. 1 or 2") from None
    if n < 1:
        raise MpqError(f"MPQ_THREADS={n} must be at least 1")
    return n


if __name__ == "__main__":
    raise SystemExit(main())
