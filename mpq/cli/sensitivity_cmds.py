"""``mpq sensitivity`` and ``mpq plot-sensitivity``: one estimator's table, its plot."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mpq.cli.args import (
    calib_spec,
    data_args,
    model_args,
    parse_formats,
    precondition_arg,
    ties_of,
)
from mpq.files import check_writable
from mpq.registry import ESTIMATORS


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from mpq.pipeline import preconditioned, prepare, sensitivity_table, task_for
    from mpq.sensitivity.runner import make_estimator, parse_params

    check_writable(Path(args.out), "--out")
    estimator = make_estimator(args.estimator, parse_params(args.param))
    formats = parse_formats(args.formats)
    prep = prepare(args.model, args.include, args.exclude, ties_of(args))
    prep = preconditioned(prep, args.precondition, calib_spec(args))
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


def add_sensitivity_parser(sub: Any) -> None:
    """Register ``sensitivity`` on the ``mpq`` subcommands ``sub``."""
    p = sub.add_parser("sensitivity", help="score every target with one estimator; write a table")
    model_args(p)
    p.add_argument("--estimator", required=True, choices=sorted(ESTIMATORS))
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="estimator parameter, e.g. tol=0.05 (repeatable)")  # fmt: skip
    p.add_argument("--formats", default="3,4,5,6,8", help="candidate formats, comma-separated")
    p.add_argument("--batch-size", type=int, default=None, help="calibration batch size")
    p.add_argument("--out", required=True, help="where to write the table JSON")
    precondition_arg(p)
    data_args(p, "wiki", "calib", 2, 128)
    p.set_defaults(func=cmd_sensitivity)


def add_plot_sensitivity_parser(sub: Any) -> None:
    """Register ``plot-sensitivity`` on the ``mpq`` subcommands ``sub``."""
    p = sub.add_parser("plot-sensitivity", help="plot a table's per-layer scores by depth (PNG)")
    p.add_argument("table", help="a sensitivity table JSON (from `mpq sensitivity`)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_plot_sensitivity)
