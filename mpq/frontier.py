"""The measured frontier of a comparison (``[frontier]`` in a compare config): NSGA-II
(:func:`mpq.solvers.bayes.bayes_frontier`) over (effective bits, measured calibration KL),
seeded from the table's own Pareto frontier, next to that frontier as the table predicts it.

Writes ``frontier.csv`` (one row per point: ``kind`` = ``measured`` for the NSGA-II frontier,
``table`` for the table's frontier plans, with their predicted and measured values) and
``frontier.png``, and returns the report's Markdown section.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpq.config import FrontierSpec
from mpq.formats import QuantFormat
from mpq.pipeline import Evaluator, Prepared
from mpq.problem import build_problem, plan_for_choice
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.bayes import MeasuredFrontier, bayes_frontier
from mpq.tasks import Task

# Full precision: the frontier search is bounded only by the candidate formats.
LOOSEST = {"bits": 16.0}


@dataclass(frozen=True)
class FrontierRow:
    kind: str  # "measured" (NSGA-II frontier) or "table" (the table's frontier plan)
    effective_bits: float
    measured: float
    predicted: float


def measured_frontier(
    prep: Prepared,
    formats: tuple[QuantFormat, ...],
    table: SensitivityTable,
    calib: Task,
    spec: FrontierSpec,
    seed: int = 0,
    progress: bool = False,
    stats_task: Task | None = None,
) -> tuple[MeasuredFrontier, list[FrontierRow]]:
    """The NSGA-II frontier on ``calib`` (mean KL to the fp model) and the table's frontier
    plans it was seeded with, as rows by effective bits. ``stats_task``: where the formats'
    mse / gptq statistics come from (default ``calib``), as for the compared plans."""
    from mpq.calib_measure import evaluator_measure

    problem = build_problem(prep.cost, formats, LOOSEST, table)
    measure = evaluator_measure(Evaluator(prep, calib, progress=False), problem, formats,
                                progress=progress, stats_task=stats_task or calib)  # fmt: skip
    front = bayes_frontier(problem, measure, n_trials=spec.trials, seed=seed,
                           population_size=spec.population)  # fmt: skip
    model_id = prep.loaded.model_id

    def bits(choice: np.ndarray) -> float:
        plan = plan_for_choice(problem, choice, prep.targets, formats, model_id, "nsga2")
        return float(prep.cost.plan_cost(plan).effective_bits)

    rows = [
        FrontierRow("measured", bits(p.choice), p.measured, problem.distortion_of(p.choice))
        for p in front.points
    ] + [FrontierRow("table", bits(t.choice), t.measured, t.predicted) for t in front.table]
    return front, sorted(rows, key=lambda r: (r.kind, r.effective_bits))


def write_frontier(folder: Path, front: MeasuredFrontier, rows: list[FrontierRow]) -> str:
    """``frontier.csv`` and ``frontier.png`` in ``folder``; returns the Markdown section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (folder / "frontier.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "effective_bits", "measured_kl", "predicted"])
        for r in rows:
            w.writerow([r.kind, f"{r.effective_bits:.4f}", f"{r.measured:.6g}",
                        f"{r.predicted:.6g}"])  # fmt: skip
    meas = [r for r in rows if r.kind == "measured"]
    tab = [r for r in rows if r.kind == "table"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r.effective_bits for r in meas], [r.measured for r in meas], "o-",
            label="NSGA-II frontier (measured calibration KL)")  # fmt: skip
    ax.plot([r.effective_bits for r in tab], [r.measured for r in tab], "x",
            label="table's frontier plans, measured")  # fmt: skip
    ax.plot([r.effective_bits for r in tab], [r.predicted for r in tab], "s--", mfc="none",
            label="table's frontier, predicted (its summed distortion, table units)")  # fmt: skip
    ax.set_xlabel("effective bits per weight")
    ax.set_ylabel("KL to fp (calibration)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "frontier.png", dpi=110)
    plt.close(fig)
    beaten = sum(
        any(m.effective_bits <= t.effective_bits and m.measured < t.measured for m in meas)
        for t in tab
    )
    return (
        "\n## Measured frontier (NSGA-II)\n\n"
        f"{front.trials} measured plans (NSGA-II, study `{front.study_name}`), seeded from "
        f"{len(tab)} plans of the table's own Pareto frontier; {len(meas)} points on the "
        f"measured frontier; {beaten} of the {len(tab)} table-frontier plans are beaten on "
        "measured KL by a plan with no more bits. `frontier.csv` has every point.\n\n"
        "![measured vs predicted frontier](frontier.png)\n"
    )


def frontier_section(
    folder: Path,
    prep: Prepared,
    formats: tuple[QuantFormat, ...],
    table: SensitivityTable,
    calib: Task,
    spec: FrontierSpec,
    **kw: Any,
) -> str:
    front, rows = measured_frontier(prep, formats, table, calib, spec, **kw)
    return write_frontier(folder, front, rows)
