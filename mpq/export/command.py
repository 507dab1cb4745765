"""``mpq export``: solve a plan under a budget and write it as a file people deploy.

One command runs prepare -> measured damage table (cached) -> solve -> quantize -> write, then
reads the written files back and checks that the stored weights fit the budget; it fails
loudly when they do not. Containers that store some formats in more bytes than mpq's packed
layout (GGUF's fp16 minimum per block, llama.cpp's k-quants, compressed-tensors' shape
tensors) are handled by solving again under a budget tightened by the overshoot, a few times;
the check on the written files has the last word.

Formats: ``mpq`` (packed safetensors + plan.json + config.json; ``mpq.load``), ``hf``
(``save_pretrained`` folder with an mpq ``quantization_config``; ``mpq.load``), ``gguf``
(llama.cpp GGUF), ``llamacpp`` (F16 GGUF + ``llama-quantize --tensor-type`` overrides),
``compressed-tensors`` (pack-quantized folder vLLM loads).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.errors import MpqError

if TYPE_CHECKING:
    from mpq.export.common import ContainerCost, Exporter
    from mpq.formats import QuantFormat
    from mpq.pipeline import Prepared
    from mpq.plan import BitPlan

MAX_RESOLVES = 6
# The same names as mpq.export.common.EXPORT_FORMATS, here so `mpq --help` imports no torch.
EXPORT_FORMATS = ("mpq", "hf", "gguf", "llamacpp", "compressed-tensors")


def exporters() -> dict[str, Exporter]:
    """The export formats by name (imports the writers lazily)."""
    from mpq.export.compressed import CT_EXPORTER
    from mpq.export.gguf_writer import GGUF_EXPORTER
    from mpq.export.llamacpp import LLAMACPP_EXPORTER
    from mpq.export.mpq_format import HF_EXPORTER, MPQ_EXPORTER

    out = {
        e.name: e
        for e in (MPQ_EXPORTER, HF_EXPORTER, GGUF_EXPORTER, LLAMACPP_EXPORTER, CT_EXPORTER)
    }
    from mpq.export.common import EXPORT_FORMATS as NAMES

    assert tuple(out) == EXPORT_FORMATS == NAMES
    return out


def add_export_parser(
    sub: Any, solver_names: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """Register ``export`` on an ``argparse`` subparsers object; returns its parser."""
    from mpq.cli import SOLVER_NAMES, model_args

    if solver_names is None:
        solver_names = SOLVER_NAMES
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
        help="candidate formats, comma-separated (default: what the --format container maps)",
    )
    p.add_argument("--format", dest="export_format", default="mpq", choices=list(EXPORT_FORMATS))
    p.add_argument("--out", required=True, help="output folder (refused if it exists)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--plan",
        default=None,
        help="export this plan (JSON file or 'uniform:<spec>') instead of solving one",
    )
    p.add_argument("--data", default="wiki", help="calibration data: wiki | bbc | photos")
    p.add_argument("--n", type=int, default=2, help="calibration windows / documents / images")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--no-guard", action="store_true",
                   help="skip the never-worse-than-uniform check on calibration KL")  # fmt: skip
    p.set_defaults(func=cmd_export)
    return p


@dataclass
class ExportReport:
    """What one export wrote and measured."""

    format: str
    folder: Path
    plan: BitPlan
    predicted_bytes: int  # the plan's total_bytes (mpq cost model)
    stored: ContainerCost  # read back from the written files
    file_bytes: int  # sizes of the files on disk (every file of the folder)
    resolves: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        s = self.stored
        return (
            f"{self.format}: wrote {self.folder} ({self.file_bytes:,} bytes on disk); stored "
            f"weights {s.total_bytes:,} bytes, {s.effective_bits:.4f} bits per target weight; "
            f"plan predicts {self.predicted_bytes:,} bytes"
        )


def _formats(text: str) -> list[QuantFormat]:
    from mpq.formats import QuantFormat

    return [QuantFormat.parse(s) for s in text.split(",") if s.strip()]


def _expressible(exporter: Exporter, formats: Sequence[QuantFormat], prep: Prepared) -> None:
    """Refuse candidate formats the container cannot store, before any solving."""
    bad = [fmt.spec() for fmt in formats if not exporter.maps_format(fmt)]
    if bad:
        raise MpqError(
            f"the {exporter.name} format cannot store the candidate format(s) {bad}; what maps: "
            f"{exporter.maps}; pass --formats from that list"
        )


def _tightened(
    limit: dict[str, float],
    budget: dict[str, float],
    over: dict[str, tuple[float, float]],
    container: ContainerCost,
    plan: BitPlan,
    prep: Prepared,
) -> dict[str, float]:
    """The next solver budget: the part a plan can vary (its target bytes) scaled down by the
    container's overhead ratio on the last plan, and never above the previous limit."""
    ratio = container.target_bytes / max(1, prep.cost.plan_cost(plan).target_bits // 8)
    fixed = prep.cost.fixed_bits / 8
    out = dict(limit)
    for r in over:
        if r == "bits":
            new = budget[r] / ratio
        else:
            new = fixed + (budget[r] - container.total_bytes + container.target_bytes) / ratio
        out[r] = min(new, limit[r] - (1e-6 if r == "bits" else 1.0))
    return out


def solve_for_container(
    prep: Prepared,
    exporter: Exporter,
    solver: str,
    formats: Sequence[QuantFormat],
    budget: dict[str, float],
    table: Any,
    calib: Any = None,
    guard: bool = False,
) -> tuple[BitPlan, int]:
    """A plan whose *container* bytes fit ``budget``: solve, predict the container's bytes,
    and re-solve under a budget tightened by the overshoot (at most ``MAX_RESOLVES`` times).
    Returns (plan, number of re-solves)."""
    from mpq.pipeline import solve

    limit = dict(budget)
    plan = None
    for attempt in range(MAX_RESOLVES + 1):
        try:
            plan, _ = solve(prep, solver, formats, limit, table, calib=calib, guard=guard)
        except MpqError as exc:
            if attempt == 0:
                raise
            raise MpqError(
                f"the budget {budget} holds the plan's mpq bytes but not the {exporter.name} "
                f"container's overhead: tightened to {limit}, {exc}"
            ) from None
        container = exporter.predict(plan, prep.targets, prep.cost)
        over = container.over(budget)
        if not over:
            return plan, attempt
        limit = _tightened(limit, budget, over, container, plan, prep)
    assert plan is not None
    raise MpqError(
        f"the {exporter.name} container stores the plan in more than the budget {budget} after "
        f"{MAX_RESOLVES} re-solves (container overhead, see `mpq export --help`); raise the "
        f"budget or use formats the container stores exactly"
    )


def _check_fit(what: str, cost: ContainerCost, budget: dict[str, float]) -> None:
    over = cost.over(budget)
    if over:
        parts = ", ".join(
            f"{r}: {s:,.6g} stored > {lim:,.6g} allowed" for r, (s, lim) in over.items()
        )
        raise MpqError(
            f"{what} do not fit the budget ({parts}); raise the budget, pass a cheaper plan or "
            f"let mpq export solve one (without --plan)"
        )


def export(
    prep: Prepared,
    plan: BitPlan,
    exporter: Exporter,
    out: Path,
    *,
    force: bool = False,
    budget: dict[str, float] | None = None,
    resolves: int = 0,
) -> ExportReport:
    """Write ``plan`` on ``prep``'s model as ``exporter``'s format into ``out``, read it back,
    check the stored bytes (equal to the plan's for mpq/hf; within ``budget`` for all), and
    write the manifest. Raises :class:`MpqError` before touching ``out`` when the format cannot
    express the plan."""
    from mpq import __version__
    from mpq.executor import apply_plan
    from mpq.export.common import ExportInput, Manifest, checksums, output_folder, write_manifest

    t0 = time.perf_counter()
    plan.validate(prep.targets)
    exporter.refuse(plan, prep.targets, prep.loaded.model)
    predicted = prep.cost.plan_cost(plan).total_bytes
    if budget:
        _check_fit(
            f"the plan's weights in the {exporter.name} container",
            exporter.predict(plan, prep.targets, prep.cost),
            budget,
        )
    packed = apply_plan(prep.loaded.model, plan, prep.targets, mode="packed")
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
        notes = exporter.write(inp, tmp)
        stored = exporter.measure(tmp, inp)
        if exporter.name in ("mpq", "hf") and stored.total_bytes != predicted:
            raise MpqError(
                f"internal error: the written tensors hold {stored.total_bytes:,} bytes but the "
                f"cost model predicts {predicted:,}; please report this"
            )
        if budget:
            _check_fit(f"the written {exporter.name} weights", stored, budget)
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
        stored=stored,
        file_bytes=file_bytes,
        resolves=resolves,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )


def run_export(args: argparse.Namespace) -> ExportReport:
    """The ``export`` command's work (see the module docstring); returns its report."""
    from mpq.pipeline import damage_table, prepare, task_for
    from mpq.plan import parse_plan_arg
    from mpq.problem import parse_budget

    exporter = exporters()[args.export_format]
    out = Path(args.out)
    if out.exists() and not args.force:
        raise MpqError(
            f"output folder {str(out)!r} already exists; pass --force to replace it or choose "
            f"another --out"
        )
    if args.plan is None and not args.budget:
        raise MpqError("give --budget (e.g. bytes=60MB or avg-bits=4.0) or an existing --plan")
    budget = parse_budget(args.budget) if args.budget else {}
    formats = _formats(args.formats or exporter.default_formats)
    prep = prepare(args.model, args.include, args.exclude, not args.no_ties)
    resolves = 0
    if args.plan is not None:
        plan = parse_plan_arg(args.plan, prep.targets, prep.loaded.model_id)
        if plan.meta.get("precondition"):
            from mpq.pipeline import prepared_for_plan

            prep = prepared_for_plan(prep, plan)
    else:
        _expressible(exporter, formats, prep)
        table = calib = None
        if args.solver != "uniform":
            calib = task_for(prep, args.data, "calib", args.n, args.seq_len, None)
            table = damage_table(prep, formats, calib)
        plan, resolves = solve_for_container(
            prep, exporter, args.solver, formats, budget, table, calib,
            guard=not args.no_guard and args.solver != "uniform",
        )  # fmt: skip
    return export(prep, plan, exporter, out, force=args.force, budget=budget, resolves=resolves)


def cmd_export(args: argparse.Namespace) -> int:
    """``mpq export``: prints one summary line (and the container's notes); 0 on success."""
    report = run_export(args)
    print(report.summary())
    if report.resolves:
        print(f"  re-solved {report.resolves} time(s) to fit the container's overhead")
    for note in report.notes:
        print(f"  note: {note}")
    return 0
