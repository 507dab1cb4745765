"""``mpq inspect`` and ``mpq eval``: a model's targets, a plan's quality."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from mpq.cli.args import data_args, model_args, stats_task, ties_of
from mpq.errors import MpqError

if TYPE_CHECKING:
    from mpq.prepared import Prepared


def cmd_inspect(args: argparse.Namespace) -> int:
    from mpq.formats import KEEP
    from mpq.pipeline import prepare
    from mpq.plan import uniform_plan

    prep = prepare(args.model, args.include, args.exclude, ties_of(args))
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

    prep = prepare(args.model, args.include, args.exclude, ties_of(args))
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
    from mpq.planstats import META_KEY, uses_stats, with_record

    if not uses_stats(plan):
        raise MpqError("--stats applies to plans with mse or gptq formats; this plan has none")
    if META_KEY in plan.meta:
        raise MpqError("the plan already records its statistics data; drop --stats")
    return with_record(plan, stats_task(prep, spec))


def add_inspect_parser(sub: Any) -> None:
    """Register ``inspect`` on the ``mpq`` subcommands ``sub``."""
    p = sub.add_parser("inspect", help="list targets, shapes, tie groups and fp bytes")
    model_args(p)
    p.set_defaults(func=cmd_inspect)


def add_eval_parser(sub: Any) -> None:
    """Register ``eval`` on the ``mpq`` subcommands ``sub``."""
    p = sub.add_parser("eval", help="evaluate a plan (or fp) on held-out data")
    model_args(p)
    p.add_argument(
        "--plan", required=True, help="plan JSON file, 'uniform:4', 'uniform:4:g128:asym', or 'fp'"
    )
    data_args(p, "wiki", "heldout", 8, None)
    p.add_argument(
        "--stats",
        default=None,
        metavar="DATA:SPLIT:NxLEN",
        help="calibration data of the plan's mse/gptq formats (importance, Hessians), e.g. "
        "wiki:calib:32x512; default: what the plan records (mse unweighted if nothing)",
    )
    p.set_defaults(func=cmd_eval)
