"""`mpq compare`: every estimator x solver x budget (x seed) on the same candidate formats and
the same evaluation data.

Steps: prepare the model; for each seed (a disjoint calibration sample) and each estimator,
compute the sensitivity table (cached per target); solve every (solver, budget) on it; build
the uniform plans; evaluate the fp model and every plan on each held-out dataset (cached per
plan); pool each policy's per-window results over seeds, each distinct plan once (CIs over
windows and seeds); write the report. A killed run resumes from the caches.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mpq.config import CompareConfig, EstimatorSpec
from mpq.cost import CostModel
from mpq.errors import MpqError
from mpq.evaluate import EvalResult, pool
from mpq.pipeline import (
    Evaluator,
    Prepared,
    QuantMemo,
    SearchOptions,
    plan_digest,
    preconditioned,
    prepare,
    sensitivity_table,
    solve,
    uniform_plans,
)
from mpq.plan import BitPlan, atomic_write_text
from mpq.precondition.spec import PreconditionSpec
from mpq.report import PlanEntry, write_report
from mpq.sensitivity.base import Estimator
from mpq.sensitivity.runner import make_estimator
from mpq.sensitivity.table import SensitivityTable
from mpq.tasks import Task


def _budget_label(budget: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in budget.items())


def _estimator(spec: EstimatorSpec, seed: int) -> Estimator:
    """The estimator of ``spec``; a stochastic one gets the comparison's seed unless set."""
    params: dict[str, Any] = dict(spec.params)
    est = make_estimator(spec.name, params)
    fields = {f.name for f in dataclasses.fields(type(est))}  # type: ignore[arg-type]
    if "seed" in fields and "seed" not in params:
        est = make_estimator(spec.name, {**params, "seed": seed})
    return est


def _stats_task(cfg: CompareConfig, loaded: Any) -> Task | None:
    """The ``[statistics]`` windows the mse / gptq formats' importance comes from (None: each
    plan's own calibration windows), as every solve and the frontier of ``cfg`` use them."""
    return cfg.statistics.spec().task(loaded, 0) if cfg.statistics else None


def _plans(
    cfg: CompareConfig, prep: Prepared, suffix: str, progress: bool
) -> tuple[list[PlanEntry], dict[tuple[str, int], SensitivityTable]]:
    """Uniform plans, then every (seed, estimator, solver, budget) plan, on one prepared model."""
    entries = []
    from mpq.planstats import uses_stats, with_record

    stats_spec = cfg.statistics or cfg.calibration
    stats_task = _stats_task(cfg, prep.loaded)
    for plan in uniform_plans(prep, cfg.uniform):
        if uses_stats(plan):  # mse / gptq baselines: the first seed's calibration statistics
            plan = with_record(plan, stats_spec.spec().task(prep.loaded, 0))
        spec = next(iter(plan.formats.values())).spec()
        entries.append(PlanEntry(f"uniform:{spec}{suffix}", f"uniform{suffix}", plan, ""))
    tables: dict[tuple[str, int], SensitivityTable] = {}
    if not cfg.solves:
        return entries, tables
    c = cfg.calibration
    for seed in cfg.seeds:
        offset = seed if c.resample else 0
        calib = c.spec().task(prep.loaded, offset)
        for est in cfg.estimators:
            t0 = time.perf_counter()
            table = sensitivity_table(prep, _estimator(est, seed), cfg.formats, calib,
                                      progress=progress, stats_task=stats_task)  # fmt: skip
            est_s = time.perf_counter() - t0
            tables[(est.label + suffix, seed)] = table
            for s in cfg.solves:
                opts = SearchOptions(seed=seed, **dict(s.options))
                for budget in s.budgets:
                    plan, sol = solve(
                        prep, s.solver, cfg.formats, budget, table, calib=calib, search=opts,
                        guard=s.guard, progress=progress, stats_task=stats_task,
                    )  # fmt: skip
                    policy = f"{s.policy}/{est.label}{suffix}"
                    label = _budget_label(budget)
                    entries.append(
                        PlanEntry(
                            f"{policy}@{label}", policy, plan, label, seed, est_s, sol.wall_time
                        )  # fmt: skip
                    )
    return entries, tables


CONFIG_FILE = "config.json"


def config_record(cfg: CompareConfig) -> dict[str, Any]:
    """What a report folder was made from: the config as data (not its file name, nor the
    reference points of other tools, which only the report draws: adding one re-renders)."""
    body = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("source", "references")}
    return _without_unmixed(json.loads(json.dumps(body, sort_keys=True, default=str)))


def _without_unmixed(obj: Any) -> Any:
    """``obj`` with the row-mix fields of plain formats left out (as ``QuantFormat.to_dict``
    writes them), so report folders made before row-mixed formats existed stay claimable."""
    if isinstance(obj, list):
        return [_without_unmixed(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {k: _without_unmixed(v) for k, v in obj.items()}
    if "bits" in out and out.get("hi", 0) is None and out.get("hi_pct") == 0:
        del out["hi"], out["hi_pct"]
    if "bits" in out and out.get("hi_axis") == "rows":  # ... and before column-mixed ones
        del out["hi_axis"]
    return out


def claim_folder(folder: Path, cfg: CompareConfig) -> None:
    """Mark ``folder`` as ``cfg``'s, or refuse when it holds results of another config (a
    rerun of the same config resumes; results of two configs are never mixed)."""
    record = config_record(cfg)
    path = folder / CONFIG_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != record:
            changed = sorted(
                k for k in set(record) | set(old or {}) if (old or {}).get(k) != record.get(k)
            )
            raise MpqError(
                f"{folder} holds the report of another config (differs in {changed or 'format'});"
                f" give the config another `name`, pass another --out, or delete the folder"
            )
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise MpqError(
            f"{folder} exists but was not written by `mpq compare` (no {CONFIG_FILE}); pass "
            f"another --out or delete the folder"
        )
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))


def run_compare(cfg: CompareConfig, out_root: Path, progress: bool = True) -> Path:
    """Run the grid of ``cfg`` and write ``out_root/<name>/``; returns the report folder."""
    base = prepare(cfg.model, cfg.include, cfg.exclude, cfg.ties)  # a bad model writes nothing
    claim_folder(out_root / cfg.name, cfg)
    c = cfg.calibration
    runs: list[tuple[Prepared, list[PlanEntry]]] = []
    tables: dict[tuple[str, int], SensitivityTable] = {}
    for text in cfg.preconditions:
        spec = PreconditionSpec.parse(text)
        suffix = "" if spec.method == "none" else f"+{text}"
        t0 = time.perf_counter()
        prep = preconditioned(base, spec, c.spec())
        if spec.method != "none":  # the calibration cost, for the report
            seconds = round(time.perf_counter() - t0, 3)
            prep.precondition = dataclasses.replace(prep.precondition, seconds=seconds)
        entries, t = _plans(cfg, prep, suffix, progress)
        if spec.method == "none":
            entries.insert(0, PlanEntry("fp32", "fp32", None, ""))
        runs.append((prep, entries))
        tables.update(t)
    rows: list[dict[str, Any]] = []
    seed_rows: list[dict[str, Any]] = []
    e = cfg.evaluation
    memos: list[QuantMemo] = [{} for _ in runs]  # each (target, format) quantized once per run
    for data_id in e.data:
        task = e.spec(data_id).task(base.loaded)
        groups: dict[str, list[tuple[PlanEntry, EvalResult, float]]] = defaultdict(list)
        for (prep, entries), memo in zip(runs, memos, strict=True):
            evaluator = Evaluator(prep, task, progress=progress, memo=memo)
            for entry in tqdm(entries, desc=f"evaluate on {data_id}", disable=not progress):
                result, eval_s = evaluator(entry.plan, label=entry.name)
                groups[entry.name].append((entry, result, eval_s))
                seed_rows.append(_row(base.cost, [entry], data_id, task.primary, result, eval_s))
        for members in groups.values():
            # Seeds that led to the same plan measured the same thing on the same data: pool
            # each distinct plan once, or its windows would count as independent units.
            distinct = list({_digest(m.plan): r for m, r, _ in members}.values())
            pooled = pool(distinct) if len(distinct) > 1 else distinct[0]
            eval_s = sum(s for _, _, s in members)
            rows.append(
                _row(base.cost, [m for m, _, _ in members], data_id, task.primary, pooled, eval_s)
            )
    planned = [x for _, entries in runs for x in entries if x.plan]
    folder = write_report(cfg, out_root / cfg.name, rows, seed_rows, planned, tables)
    if cfg.frontier is not None:
        from mpq.frontier import frontier_section

        # The first preconditioning's model, the first estimator's table of the first seed,
        # on that seed's calibration sample: what the first [[solve]] plans were made from.
        spec = PreconditionSpec.parse(cfg.preconditions[0])
        suffix = "" if spec.method == "none" else f"+{cfg.preconditions[0]}"
        seed = cfg.seeds[0]
        calib = c.spec().task(runs[0][0].loaded, seed if c.resample else 0)
        table = tables[(cfg.estimators[0].label + suffix, seed)]
        stats = _stats_task(cfg, runs[0][0].loaded) or calib
        section = frontier_section(folder, runs[0][0], cfg.formats, table, calib, cfg.frontier,
                                   seed=seed, progress=progress, stats_task=stats)  # fmt: skip
        report = folder / "report.md"
        atomic_write_text(report, report.read_text() + section)
    return folder


def _digest(plan: BitPlan | None) -> str:
    return plan_digest(plan) if plan is not None else "fp32"


def _row(
    cost: CostModel,
    entries: list[PlanEntry],
    data_id: str,
    primary: str,
    result: EvalResult,
    eval_s: float,
) -> dict[str, Any]:
    """One table row; several entries (one per seed) are averaged on cost and time."""
    first = entries[0]
    # The fp model (no plan): every tensor at its own dtype (32 bits for an fp32 model).
    reps = [cost.plan_cost(x.plan) for x in entries if x.plan is not None] or [cost.fp_report()]
    eff = sum(r.effective_bits for r in reps) / len(reps)
    model_bits = sum(r.model_bits for r in reps) / len(reps)
    nbytes = sum(r.total_bytes for r in reps) / len(reps)
    bops = sum(r.bops or 0 for r in reps) / len(reps) if reps[0].bops is not None else None
    seeds = [x.seed for x in entries if x.seed is not None]
    return {
        "data": data_id,
        "primary": primary,
        "plan": first.name,
        "policy": first.policy,
        "budget": first.budget,
        "seeds": " ".join(str(s) for s in seeds) if seeds else "",
        "distinct_plans": len({_digest(x.plan) for x in entries}),
        "effective_bits": eff,
        "model_bits": model_bits,
        "bytes": nbytes,
        "bops": bops,
        **result.metrics,
        "estimator_s": sum(x.estimator_s for x in entries) / len(entries),
        "solver_s": sum(x.solver_s for x in entries) / len(entries),
        "eval_s": eval_s,
    }
