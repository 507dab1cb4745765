"""`[frontier]` in a compare config: the NSGA-II measured frontier drawn next to the table's
predicted frontier, on the tiny LLaMA (seconds)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mpq.compare import run_compare
from mpq.config import parse_config
from mpq.errors import MpqError


def _cfg(folder: Path, **extra: object) -> dict:
    return {
        "name": "front",
        "model": str(folder),
        "formats": ["3", "4", "8"],
        "uniform": ["4"],
        "calibration": {"data": "wiki", "n": 1, "seq_len": 16},
        "evaluation": {"data": ["wiki"], "n": 2, "seq_len": 16},
        "solve": [{"solver": "ilp", "budgets": ["bits=5"]}],
        **extra,
    }


def test_compare_draws_the_measured_frontier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import build_tiny_folder

    folder = build_tiny_folder(tmp_path / "llama")
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(_cfg(folder, frontier={"trials": 12, "population": 4}))
    out = run_compare(cfg, tmp_path / "reports", progress=False)
    report = (out / "report.md").read_text()
    assert "## Measured frontier (NSGA-II)" in report and "frontier.png" in report
    assert (out / "frontier.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    measured = [r for r in rows if r["kind"] == "measured"]
    table = [r for r in rows if r["kind"] == "table"]
    assert measured and table
    bits = [float(r["effective_bits"]) for r in measured]
    kl = [float(r["measured_kl"]) for r in measured]
    assert bits == sorted(bits) and all(b > a for a, b in zip(kl[1:], kl[:-1], strict=True))
    for t in table:  # every seeded table plan is matched or beaten by the measured frontier
        assert any(
            float(m["effective_bits"]) <= float(t["effective_bits"]) + 1e-9
            and float(m["measured_kl"]) <= float(t["measured_kl"])
            for m in measured
        )


def test_frontier_config_errors(tmp_path: Path) -> None:
    with pytest.raises(MpqError, match="trials"):
        parse_config(_cfg(tmp_path, frontier={"population": 4}))
    with pytest.raises(MpqError, match="population must be an integer >= 2"):
        parse_config(_cfg(tmp_path, frontier={"trials": 5, "population": 1}))
    with pytest.raises(MpqError, match="add one"):
        parse_config({**_cfg(tmp_path, frontier={"trials": 5}), "solve": []})
