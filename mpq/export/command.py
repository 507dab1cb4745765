"""``mpq export``: solve a plan under a budget and write it as a file people deploy.

One command runs prepare -> measured damage table (cached) -> solve -> quantize -> write. The
solve counts each candidate format at the bytes the chosen container really stores (GGUF's
fp16 minimum per block, llama.cpp's k-quants, compressed-tensors' shape tensors: each
container's ``weight_bytes``), so the plan fits the budget in that container; the written
files are read back and must hold exactly the predicted bytes.

Formats: ``mpq`` (packed safetensors + plan.json + config.json; ``mpq.load``), ``hf``
(``save_pretrained`` folder with an mpq ``quantization_config``; ``mpq.load``), ``gguf``
(llama.cpp GGUF), ``llamacpp`` (F16 GGUF + ``llama-quantize --tensor-type`` overrides),
``compressed-tensors`` (pack-quantized folder vLLM loads).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.errors import MpqError
from mpq.registry import EXPORTERS
from mpq.registry import solver_names as all_solver_names

if TYPE_CHECKING:
    from mpq.export.common import ContainerCost, Exporter
    from mpq.formats import QuantFormat
    from mpq.plan import BitPlan
    from mpq.prepared import Prepared
    from mpq.tasks import Task


def exporters() -> dict[str, Exporter]:
    """The export formats by name (:data:`mpq.registry.EXPORTERS`; imports the writers)."""
    return {name: EXPORTERS.load(name) for name in EXPORTERS}


def add_export_parser(
    sub: Any, solver_names: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """Register ``export`` on an ``argparse`` subparsers object; returns its parser."""
    from mpq.cli.args import model_args

    if solver_names is None:
        solver_names = all_solver_names()
    p: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="solve under a budget, quantize and write a deployable file (mpq, hf, gguf, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_args(p)
    p.add_argument(
        "--budget",
        default=None,
        help="e.g. 'bytes=60MB', '60MiB', 'avg-bits=4.0', 'bits=4.0' (required unless --plan)",
    )
    p.add_argument("--solver", default="ilp", choices=list(solver_names))
    p.add_argument(
        "--formats",
        default=None,
        help="candidate formats, comma-separated (default: the model's recipe, mpq.recipes, when "
        "the --format container stores all of them, else the container's own default)",
    )
    p.add_argument("--format", dest="export_format", default="mpq", choices=list(EXPORTERS))
    p.add_argument("--out", required=True, help="output folder (refused if it exists)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--plan",
        default=None,
        help="export this plan (JSON file or 'uniform:<spec>') instead of solving one",
    )
    from mpq.cli.args import RECIPE_DEFAULT as recipe
    from mpq.cli.args import table_data_args

    p.add_argument(
        "--data", default=None, help="calibration data: wiki | bbc | wiki+bbc | photos" + recipe
    )
    p.add_argument(
        "--n", type=int, default=None, help="calibration windows / documents / images" + recipe
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="tokens per calibration window" + recipe
    )
    p.add_argument("--no-guard", action="store_true",
                   help="skip the never-worse-than-uniform check on calibration KL")  # fmt: skip
    table_data_args(p)
    p.set_defaults(func=cmd_export)
    return p


@dataclass
class ExportReport:
    """What one export wrote and measured."""

    format: str
    folder: Path
    plan: BitPlan
    predicted_bytes: int  # the plan's total bytes in this container (its storage)
    mpq_bytes: int  # the plan's total bytes in mpq's packed layout
    stored: ContainerCost  # read back from the written files (equal to predicted_bytes)
    file_bytes: int  # sizes of the files on disk (every file of the folder)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model_numel: int = 0  # every value of the model's tensors, each memory once

    @property
    def model_bits(self) -> float:
        """Stored bits per model value: every tensor's bytes over every value (what llama.cpp
        reports as bpw; embeddings and norms included)."""
        return 8 * self.stored.total_bytes / self.model_numel if self.model_numel else 0.0

    def summary(self) -> str:
        s = self.stored
        return (
            f"{self.format}: wrote {self.folder} ({self.file_bytes:,} bytes on disk); stored "
            f"weights {s.total_bytes:,} bytes, {s.effective_bits:.4f} bits per target weight, "
            f"{self.model_bits:.4f} bits per model value; plan predicts "
            f"{self.predicted_bytes:,} bytes"
        )


def _expressible(exporter: Exporter, formats: Sequence[QuantFormat], prep: Prepared) -> None:
    """Refuse candidate formats the container cannot store, before any solving."""
    bad = [fmt.spec() for fmt in formats if not exporter.maps_format(fmt)]
    if bad:
        raise MpqError(
            f"the {exporter.name} format cannot store the candidate format(s) {bad}; what maps: "
            f"{exporter.maps}; pass --formats from that list"
        )


def solve_for_container(
    prep: Prepared,
    exporter: Exporter,
    solver: str,
    formats: Sequence[QuantFormat],
    budget: dict[str, float],
    table: Any,
    calib: Task | None = None,
    guard: bool = False,
    stats_task: Task | None = None,
) -> BitPlan:
    """A plan whose bytes *in the container* fit ``budget``: one solve on a problem whose
    ``bits``/``bytes`` costs are the container's :attr:`~mpq.export.common.Exporter.storage`."""
    from mpq.pipeline import solve

    in_container = dataclasses.replace(prep, cost=prep.cost.in_container(exporter.storage))
    plan, _ = solve(
        in_container, solver, formats, budget, table, calib=calib, guard=guard,
        stats_task=stats_task,
    )  # fmt: skip
    return plan


def export(
    prep: Prepared,
    plan: BitPlan,
    exporter: Exporter,
    out: Path,
    *,
    force: bool = False,
    budget: dict[str, float] | None = None,
    solve_notes: Sequence[str] = (),
) -> ExportReport:
    """Write ``plan`` on ``prep``'s model as ``exporter``'s format into ``out``, read it back,
    check the stored bytes (equal to the container's predicted bytes, which must fit ``budget``),
    and write the manifest. Raises :class:`MpqError` before touching ``out`` when the format cannot
    express the plan."""
    from mpq import __version__
    from mpq.cost import check_fit
    from mpq.executor import apply_plan
    from mpq.export.common import ExportInput, Manifest, checksums, output_folder, write_manifest

    t0 = time.perf_counter()
    plan.validate(prep.targets)
    exporter.refuse(plan, prep.targets, prep.loaded.model)
    predicted = exporter.predict(plan, prep.cost).total_bytes
    if budget:
        check_fit(
            f"the plan's weights in the {exporter.name} container",
            exporter.predict(plan, prep.cost),
            budget,
        )
    from mpq.planstats import plan_stats

    stats = plan_stats(prep.loaded, prep.targets, plan)  # mse / gptq formats: recorded data
    packed = apply_plan(prep.loaded.model, plan, prep.targets, mode="packed", stats=stats)
    inp = ExportInput(
        model=prep.loaded.model,
        packed=packed,
        plan=plan,
        targets=prep.targets,
        model_id=prep.loaded.model_id,
        cost=prep.cost,
        tokenizer=prep.loaded.tokenizer,
    )
    with output_folder(out, force) as tmp:
        notes = [*solve_notes, *exporter.write(inp, tmp)]
        stored = exporter.measure(tmp, inp)
        if stored.total_bytes != predicted:
            raise MpqError(
                f"internal error: the written {exporter.name} tensors hold "
                f"{stored.total_bytes:,} bytes but the cost model predicts {predicted:,}; "
                f"please report this"
            )
        manifest = Manifest(
            format=exporter.name,
            model_id=prep.loaded.model_id,
            files=checksums(tmp),
            predicted_bytes=predicted,
            stored_bytes=stored.total_bytes,
            stored_target_bytes=stored.target_bytes,
            budget=dict(budget or {}),
            notes=notes,
            mpq_version=__version__,
        )
        write_manifest(tmp, manifest)
        file_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return ExportReport(
        format=exporter.name,
        folder=out,
        plan=plan,
        predicted_bytes=predicted,
        mpq_bytes=prep.cost.plan_cost(plan).total_bytes,
        stored=stored,
        file_bytes=file_bytes,
        notes=notes,
        seconds=time.perf_counter() - t0,
        model_numel=prep.cost.model_numel,
    )


def run_export(args: argparse.Namespace) -> ExportReport:
    """The ``export`` command's work (see the module docstring); returns its report."""
    from mpq.cli.args import fill_recipe, parse_formats, stats_task, ties_of
    from mpq.cost import parse_budget
    from mpq.export.common import check_output_folder
    from mpq.formats import QuantFormat
    from mpq.pipeline import damage_table, prepare, task_for
    from mpq.plan import parse_plan_arg
    from mpq.recipes import recipe_for

    exporter: Exporter = EXPORTERS.load(args.export_format)
    out = Path(args.out)
    check_output_folder(out, args.force)
    if args.plan is None and not args.budget:
        raise MpqError("give --budget (e.g. bytes=60MB or avg-bits=4.0) or an existing --plan")
    budget = parse_budget(args.budget) if args.budget else {}
    solve_notes: list[str] = []
    # The model's recipe, less the formats the container cannot store (GGUF: the row-mixed
    # ones) when it stores the recipe's anchor; else the container's own default.
    r = recipe_for(args.model)
    anchor = QuantFormat.parse(r.anchor) if r.anchor else None
    stores_some = any(exporter.maps_format(f) for f in parse_formats(r.formats))
    if stores_some and (anchor is None or exporter.maps_format(anchor)):
        formats = parse_formats(fill_recipe(args, keep=exporter.maps_format))
    else:
        formats = parse_formats(fill_recipe(args, exporter.default_formats))
    prep = prepare(args.model, args.include, args.exclude, ties_of(args))
    if args.plan is not None:
        plan = parse_plan_arg(args.plan, prep.targets, prep.loaded.model_id)
        if plan.meta.get("precondition"):
            from mpq.pipeline import prepared_for_plan

            prep = prepared_for_plan(prep, plan)
    else:
        _expressible(exporter, formats, prep)
        solve_notes = exporter.dropped(prep.targets, formats)
        table = calib = None
        stats = stats_task(prep, args.stats) if getattr(args, "stats", None) else None
        if args.solver != "uniform":
            calib = task_for(prep, args.data, "calib", args.n, args.seq_len, None)
            table = damage_table(
                prep, formats, calib, anchor=getattr(args, "anchor", None), stats_task=stats
            )
        plan = solve_for_container(
            prep, exporter, args.solver, formats, budget, table, calib,
            guard=not args.no_guard and args.solver != "uniform", stats_task=stats,
        )  # fmt: skip
    return export(
        prep, plan, exporter, out, force=args.force, budget=budget, solve_notes=solve_notes
    )


def cmd_export(args: argparse.Namespace) -> int:
    """``mpq export``: prints one summary line (and the container's notes); 0 on success."""
    report = run_export(args)
    print(report.summary())
    for note in report.notes:
        print(f"  note: {note}")
    return 0
