"""The `mpq` command: the only place where names map to solvers, models and formats.

Bad input exits with status 2 and one ``error:`` line that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mpq.cli.args import SOLVER_NAMES, model_args
from mpq.cli.cache_cmds import add_cache_parser
from mpq.cli.compare_cmds import add_compare_parser
from mpq.cli.model_cmds import add_eval_parser, add_inspect_parser
from mpq.cli.sensitivity_cmds import add_plot_sensitivity_parser, add_sensitivity_parser
from mpq.cli.solve_cmds import add_bounds_parser, add_solve_parser
from mpq.errors import MpqError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_inspect_parser(sub)
    add_eval_parser(sub)
    add_solve_parser(sub)
    add_sensitivity_parser(sub)
    add_plot_sensitivity_parser(sub)
    add_bounds_parser(sub)
    add_compare_parser(sub)
    add_cache_parser(sub)

    from mpq.cli.bench_cmds import add_bench_layers_parser
    from mpq.export.command import add_export_parser

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
