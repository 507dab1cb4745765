"""``mpq compare``: run a comparison config and write its report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def cmd_compare(args: argparse.Namespace) -> int:
    from mpq.compare import run_compare
    from mpq.config import load_config

    cfg = load_config(args.config)
    t0 = time.perf_counter()
    folder = run_compare(cfg, Path(args.out))
    print(f"report: {folder / 'report.md'}  ({time.perf_counter() - t0:.0f} s)")
    return 0


def add_compare_parser(sub: Any) -> None:
    """Register ``compare`` on the ``mpq`` subcommands ``sub``."""
    p = sub.add_parser("compare", help="run a comparison config and write a report")
    p.add_argument(
        "--config", required=True, help="TOML file, e.g. experiments/configs/smollm2.toml"
    )
    p.add_argument("--out", default="reports", help="folder for reports/<name>/")
    p.set_defaults(func=cmd_compare)
