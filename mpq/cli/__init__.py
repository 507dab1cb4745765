"""The ``mpq`` command: :func:`main` parses the arguments (:mod:`mpq.cli.main`), each command
group lives in its own module (``model_cmds``, ``solve_cmds``, ``sensitivity_cmds``,
``compare_cmds``; ``export`` in :mod:`mpq.export.command`, ``bench-layers`` in
:mod:`mpq.cli.bench_cmds`) and the argument builders they share in :mod:`mpq.cli.args`."""

from __future__ import annotations

from mpq.cli.args import SOLVER_NAMES, model_args
from mpq.cli.main import build_parser, main

__all__ = ["SOLVER_NAMES", "build_parser", "main", "model_args"]
