"""`mpq compare`: every policy of a config on the same candidate table and evaluation data.

Steps: prepare the model; measure the damage table on calibration data (cached per target) if a
solver needs it; build uniform plans and solve every (solver, budget); evaluate the fp model and
every plan on each held-out dataset (cached per plan); write the report. A killed run resumes
from the caches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mpq.config import CompareConfig
from mpq.formats import QuantFormat
from mpq.pipeline import Evaluator, damage_table, prepare, solve, task_for, uniform_plans
from mpq.plan import BitPlan
from mpq.report import write_report


@dataclass(frozen=True)
class PlanEntry:
    name: str
    policy: str
    plan: BitPlan | None
    budget: str
    estimator_s: float
    solver_s: float


def _budget_label(budget: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in budget.items())


def run_compare(cfg: CompareConfig, out_root: Path, progress: bool = True) -> Path:
    """Run the grid of ``cfg`` and write ``out_root/<name>/``; returns the report folder."""
    prep = prepare(cfg.model, cfg.include, cfg.exclude, cfg.ties)
    entries: list[PlanEntry] = [PlanEntry("fp32", "fp32", None, "", 0.0, 0.0)]
    for plan in uniform_plans(prep, cfg.uniform):
        spec = next(iter(plan.formats.values())).spec()
        entries.append(PlanEntry(f"uniform:{spec}", "uniform", plan, "", 0.0, 0.0))
    table = None
    est_s = 0.0
    if any(s.solver != "uniform" for s in cfg.solves):
        c = cfg.calibration
        calib = task_for(prep, c.data[0], c.split, c.n, c.seq_len, c.batch_size)
        t0 = time.perf_counter()
        table = damage_table(prep, cfg.formats, calib, progress=progress)
        est_s = time.perf_counter() - t0
    for s in cfg.solves:
        for budget in s.budgets:
            plan, sol = solve(prep, s.solver, cfg.formats, budget, table)
            label = _budget_label(budget)
            entries.append(
                PlanEntry(
                    f"{s.solver}@{label}",
                    s.solver,
                    plan,
                    label,
                    est_s if s.solver != "uniform" else 0.0,
                    sol.wall_time,
                )
            )
    rows: list[dict[str, Any]] = []
    e = cfg.evaluation
    for data_id in e.data:
        task = task_for(prep, data_id, e.split, e.n, e.seq_len, e.batch_size)
        evaluator = Evaluator(prep, task, progress=progress)
        for entry in tqdm(entries, desc=f"evaluate on {data_id}", disable=not progress):
            result, eval_s = evaluator(entry.plan, label=entry.name)
            rows.append(_row(prep.cost, entry, data_id, result.metrics, eval_s))
    return write_report(cfg, out_root / cfg.name, rows, [x for x in entries if x.plan], table)


def _row(
    cost: Any, entry: PlanEntry, data_id: str, metrics: dict[str, float], eval_s: float
) -> dict[str, Any]:
    if entry.plan is None:
        eff, model_bits, nbytes, bops = 32.0, 32.0, cost.fp_bits // 8, None
    else:
        rep = cost.plan_cost(entry.plan)
        eff, model_bits, nbytes, bops = (
            rep.effective_bits,
            rep.model_bits,
            rep.total_bytes,
            rep.bops,
        )
    return {
        "data": data_id,
        "plan": entry.name,
        "policy": entry.policy,
        "budget": entry.budget,
        "effective_bits": eff,
        "model_bits": model_bits,
        "bytes": nbytes,
        "bops": bops,
        **metrics,
        "estimator_s": entry.estimator_s,
        "solver_s": entry.solver_s,
        "eval_s": eval_s,
    }


def formats_label(formats: tuple[QuantFormat, ...]) -> str:
    return ", ".join(f.spec() for f in formats)
