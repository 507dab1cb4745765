"""A comparison killed in the middle of its grid resumes without redoing finished work."""

from __future__ import annotations

from pathlib import Path

import pytest

import mpq.pipeline
from mpq.compare import run_compare
from mpq.config import parse_config


def test_killed_compare_resumes_from_the_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import build_tiny_folder

    folder = build_tiny_folder(tmp_path / "llama")
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(
        {
            "name": "resume",
            "model": str(folder),
            "formats": ["3", "4", "8"],
            "uniform": ["4", "8"],
            "calibration": {"data": "wiki", "n": 1, "seq_len": 16},
            "evaluation": {"data": ["wiki"], "n": 2, "seq_len": 16},
            "solve": [{"solver": "ilp", "budgets": ["bits=4.6", "bits=5.5"]}],
        }
    )
    # Evaluations are of plans (evaluate) and of the fp model (evaluate_reference, read off the
    # reference logits): count both.
    real = {name: getattr(mpq.pipeline, name) for name in ("evaluate", "evaluate_reference")}
    calls: list[int] = []

    def patch(die_at: int = 0) -> None:
        for name, fn in real.items():

            def wrapped(*args: object, _fn: object = fn, **kwargs: object) -> object:
                calls.append(1)
                if len(calls) == die_at:
                    raise KeyboardInterrupt
                return _fn(*args, **kwargs)  # type: ignore[operator]

            monkeypatch.setattr(mpq.pipeline, name, wrapped)

    # An uninterrupted run in a cache of its own: how many evaluations the grid needs.
    patch()
    run_compare(cfg, tmp_path / "full", progress=False)
    needed = len(calls)
    assert needed >= 4  # fp32, two uniform plans, at least one distinct ILP plan
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache2"))
    calls.clear()

    patch(die_at=4)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, tmp_path / "reports", progress=False)
    assert not (tmp_path / "reports" / "resume" / "report.md").exists()
    calls.clear()
    patch()
    run_compare(cfg, tmp_path / "reports", progress=False)
    assert len(calls) == needed - 3  # the 3 evaluations finished before the kill are reused
    assert (tmp_path / "reports" / "resume" / "report.md").is_file()


def test_preconditioners_are_one_more_axis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    from conftest import build_tiny_folder

    from mpq.plan import BitPlan

    folder = build_tiny_folder(tmp_path / "llama")
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(
        {
            "name": "pre",
            "model": str(folder),
            "formats": ["3:asym", "8:asym"],
            "uniform": ["3:asym"],
            "preconditions": ["none", "scale_folding"],
            "calibration": {"data": "wiki", "n": 1, "seq_len": 32},
            "evaluation": {"data": ["wiki"], "n": 1, "seq_len": 16},
            "solve": [{"solver": "ilp", "budgets": ["bits=5.0"]}],
        }
    )
    out = run_compare(cfg, tmp_path / "reports", progress=False)
    rows = {r["plan"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {
        "fp32", "uniform:3:asym", "uniform:3:asym+scale_folding",
        "ilp/measured@bits=5", "ilp/measured+scale_folding@bits=5",
    }  # fmt: skip
    # Folding changes no shapes, so the same plan costs the same; its outputs differ.
    a, b = rows["uniform:3:asym"], rows["uniform:3:asym+scale_folding"]
    assert a["effective_bits"] == b["effective_bits"] and a["kl"] != b["kl"]
    plan = BitPlan.load(out / "plans" / "ilp_measured+scale_folding@bits=5~seed0.json")
    assert plan.meta["precondition"]["method"] == "scale_folding"
    assert plan.meta["precondition"]["seconds"] > 0
    assert "## Preconditioning" in (out / "report.md").read_text()


def test_searches_and_the_guard_in_a_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bayes runs once per seed with that seed; a guarded ILP is its own policy, and what the
    guard returned is what was evaluated."""
    import csv

    from conftest import build_tiny_folder

    from mpq.plan import BitPlan

    folder = build_tiny_folder(tmp_path / "llama")
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(
        {
            "name": "search",
            "model": str(folder),
            "formats": ["3", "4", "8"],
            "uniform": ["4"],
            "seeds": [0, 1],
            "calibration": {"data": "wiki", "n": 1, "seq_len": 16, "resample": False},
            "evaluation": {"data": ["wiki"], "n": 1, "seq_len": 16},
            "solve": [
                {"solver": "bayes", "budgets": ["bits=4.6"], "trials": 4},
                {"solver": "ilp", "budgets": ["bits=4.6"], "guard": True},
                {"solver": "closed_form", "budgets": ["bits=4.6"]},
            ],
        }
    )
    out = run_compare(cfg, tmp_path / "reports", progress=False)
    pooled = {r["plan"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert {"bayes/measured@bits=4.6", "ilp+guard/measured@bits=4.6"} <= set(pooled)
    # Both seeds gave the same ILP plan: pooled once, its CI is the single evaluation's.
    by_seed = [r for r in csv.DictReader((out / "results_by_seed.csv").open())
               if r["plan"] == "ilp+guard/measured@bits=4.6"]  # fmt: skip
    assert len(by_seed) == 2 and pooled["ilp+guard/measured@bits=4.6"]["distinct_plans"] == "1"
    assert pooled["ilp+guard/measured@bits=4.6"]["kl_se"] == by_seed[0]["kl_se"]
    for seed in (0, 1):
        plan = BitPlan.load(out / "plans" / f"bayes_measured@bits=4.6~seed{seed}.json")
        assert plan.meta["search"]["seed"] == seed and plan.meta["search"]["trials"] == 4
        guarded = BitPlan.load(out / "plans" / f"ilp+guard_measured@bits=4.6~seed{seed}.json")
        assert guarded.meta["guard"] in ("kept", "replaced")
        assert guarded.meta["measured_mixed"] >= 0
    # One calibration sample for both seeds: the deterministic ILP sees the same table.
    a, b = (BitPlan.load(out / "plans" / f"ilp+guard_measured@bits=4.6~seed{s}.json")
            for s in (0, 1))  # fmt: skip
    assert a.formats == b.formats
    report = (out / "report.md").read_text()
    assert "one calibration sample" in report
    baq = BitPlan.load(out / "plans" / "closed_form_measured@bits=4.6~seed0.json")
    inside = baq.meta["equal_loss_interior"]
    assert f"| closed_form/measured@bits=4.6 (seed 0,1) | {inside} |" in report


def test_statistics_section_feeds_the_mse_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[statistics]`: the mse formats' importance comes from its windows, not from the measured
    table's calibration; plans and uniform baselines record it, and the table follows it."""
    import csv
    import json

    from conftest import build_tiny_folder

    from mpq.plan import BitPlan

    folder = build_tiny_folder(tmp_path / "llama")
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    base = {
        "model": str(folder),
        "formats": ["3:g16:mse", "4:g16:dq:mse", "8:g16"],
        "uniform": ["4:g16:dq:mse"],
        "calibration": {"data": "wiki", "n": 1, "seq_len": 16},
        "evaluation": {"data": ["wiki"], "n": 1, "seq_len": 16},
        "solve": [{"solver": "ilp", "budgets": ["bits=5.0"]}],
    }
    outs = {}
    for n in (1, 3):
        cfg = parse_config({**base, "name": f"st{n}",
                            "statistics": {"data": "wiki", "n": n, "seq_len": 32}})  # fmt: skip
        outs[n] = run_compare(cfg, tmp_path / "reports", progress=False)
    for n, out in outs.items():
        plan = BitPlan.load(out / "plans" / "ilp_measured@bits=5~seed0.json")
        assert (plan.meta["stats"]["n"], plan.meta["stats"]["seq_len"]) == (n, 32)
        uni = BitPlan.load(next((out / "plans").glob("uniform*.json")))
        assert uni.meta["stats"]["n"] == n
    # Other statistics, other mse candidates: the cached table was not reused.
    tables = [json.loads((o / "sensitivity" / "measured~seed0.json").read_text())["_data"]
              for o in outs.values()]  # fmt: skip
    assert tables[0]["distortions"] != tables[1]["distortions"]
    rows = [list(csv.DictReader((o / "results.csv").open())) for o in outs.values()]
    assert all(r for r in rows)
