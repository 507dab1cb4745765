"""Argument builders every ``mpq`` command group shares (torch-free: ``mpq --help`` imports
no torch), and the small conversions of their values."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mpq.errors import MpqError
from mpq.registry import MODELS, solver_names

if TYPE_CHECKING:
    from mpq.formats import QuantFormat
    from mpq.tasks import CalibSpec


# Every --solver name: the registry's table solvers and searches (torch-free).
SOLVER_NAMES = solver_names()


class _NoDefaultExclude(argparse.Action):
    """``--no-default-exclude``: an empty exclude list unless ``--exclude`` gives one (in any
    order): ``prepare`` applies the model's default excludes only when ``exclude`` is None."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        if namespace.exclude is None:
            namespace.exclude = []


def model_args(p: argparse.ArgumentParser) -> None:
    """--model, --include, --exclude, --no-default-exclude, --no-ties (every command that
    prepares a model)."""
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
        "--no-default-exclude",
        action=_NoDefaultExclude,
        nargs=0,
        help="target what the model leaves out by default too (SmolLM2: the tied "
        "embedding/head); --exclude patterns still apply",
    )
    p.add_argument(
        "--ties",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tie q/k/v and gate/up projections to one format (fused kernels need it); "
        "--no-ties gives each its own (default: the model's recipe, mpq.recipes)",
    )


def ties_of(args: argparse.Namespace) -> bool:
    """``--ties`` / ``--no-ties`` when given, else the model's recipe."""
    from mpq.recipes import recipe_for

    given = getattr(args, "ties", None)
    return recipe_for(args.model).ties if given is None else bool(given)


def data_args(
    p: argparse.ArgumentParser, default: str | None, split: str, n: int | None, seq: int | None
) -> None:
    """--data, --split, --n, --seq-len; a None default means the model's recipe
    (:func:`fill_recipe`)."""
    recipe = RECIPE_DEFAULT
    p.add_argument(
        "--data",
        default=default,
        help="wiki | bbc | a mixture such as wiki+bbc (text), photos (CNN)"
        + ("" if default else recipe),
    )
    p.add_argument("--split", default=split, help="calib | heldout")
    p.add_argument(
        "--n", type=int, default=n, help="windows / documents / images" + ("" if n else recipe)
    )
    p.add_argument(
        "--seq-len", type=int, default=seq, help="tokens per window" + ("" if seq else recipe)
    )


RECIPE_DEFAULT = " (default: the model's recipe, mpq.recipes)"


def table_data_args(p: argparse.ArgumentParser) -> None:
    """--stats and --anchor (``solve`` and ``export``): where the importance of mse / gptq
    formats comes from, and the anchor of the measured table; both default to the model's
    recipe (:func:`fill_recipe`)."""
    p.add_argument(
        "--stats",
        default=None,
        metavar="DATA:SPLIT:NxLEN",
        help="calibration data of mse/gptq formats' importance and Hessians, e.g. "
        "wiki:calib:16x512 (one forward pass; default: the model's recipe, else the calibration "
        "windows; 'none': the calibration windows)",
    )
    p.add_argument(
        "--anchor",
        default=None,
        metavar="FORMAT",
        help="measure each layer's damage at this format only and carry it to the other "
        "formats by the layer's output error (about one table column's cost; see "
        "mpq.sensitivity.measured; default: the model's recipe; 'none': measure every format)",
    )


def fill_recipe(
    args: argparse.Namespace,
    formats: str | None = None,
    keep: Callable[[QuantFormat], bool] | None = None,
) -> str:
    """Fill what the command line left unset (None) from the model's recipe
    (:mod:`mpq.recipes`) and return the candidate formats. ``--data``, ``--n``, ``--seq-len``
    come from the recipe; its formats, ``--anchor`` and ``--stats`` are one package, used
    when ``--formats`` is not given (``formats``: the default to use instead of the recipe's,
    e.g. a container's; ``keep``: only the recipe's formats it accepts, e.g. those a container
    stores, the package otherwise kept). ``--anchor none`` / ``--stats none`` turn a choice
    off."""
    from mpq.formats import QuantFormat
    from mpq.recipes import recipe_for

    r = recipe_for(args.model)
    if keep is not None:
        kept = [s for s in r.formats.split(",") if keep(QuantFormat.parse(s))]
        r = dataclasses.replace(r, formats=",".join(kept))
    for name in ("data", "n", "seq_len"):
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(r, name))
    package = not args.formats and formats is None
    for name in ("anchor", "stats"):
        value = getattr(args, name, None)
        if value is None:
            setattr(args, name, getattr(r, name) if package else None)
        elif str(value).lower() == "none":
            setattr(args, name, None)
    return str(args.formats or formats or r.formats)


def precondition_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precondition",
        default="none",
        metavar="SPEC",
        help="equivalence transform before quantizing: none, scale_folding[:alpha=0.5], "
        "awq[:fmt=3:asym] (fitted on the calibration data; recorded in the plan)",
    )


def calib_spec(args: argparse.Namespace) -> CalibSpec:
    from mpq.tasks import CalibSpec

    return CalibSpec(args.data, args.split, args.n, args.seq_len, getattr(args, "batch_size", None))


def stats_task(prep: Any, spec: str) -> Any:
    """The calibration :class:`~mpq.tasks.Task` of ``--stats DATA:SPLIT:NxLEN`` on ``prep``'s
    model: where mse / gptq formats' importance and Hessians come from."""
    from mpq.pipeline import task_for

    parts = spec.split(":")
    shape = parts[2].split("x") if len(parts) == 3 else []
    if len(parts) != 3 or len(shape) != 2 or not all(p.isdigit() for p in shape):
        raise MpqError(f"--stats {spec!r}: expected DATA:SPLIT:NxLEN, e.g. wiki:calib:32x512")
    if parts[1] not in ("calib", "train"):
        raise MpqError(f"--stats {spec!r}: statistics come from calibration data, not {parts[1]!r}")
    if int(shape[0]) < 1 or int(shape[1]) < 2:
        raise MpqError(f"--stats {spec!r}: need at least 1 window of 2 tokens")
    return task_for(prep, parts[0], parts[1], int(shape[0]), int(shape[1]), None)


def parse_formats(text: str) -> list:
    from mpq.formats import QuantFormat

    return [QuantFormat.parse(s) for s in text.split(",") if s.strip()]
