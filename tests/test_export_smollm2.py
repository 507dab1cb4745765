"""`mpq export` on the real model (SmolLM2-135M): solve under a byte budget, write, reload."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from mpq.executor import apply_plan
from mpq.export.command import add_export_parser, run_export
from mpq.export.load import load_export
from mpq.export.mpq_format import WEIGHTS
from mpq.export.safetensors import tensor_bytes_in_file
from mpq.formats import QuantFormat
from mpq.pipeline import prepare
from mpq.plan import uniform_plan

pytestmark = pytest.mark.slow
INCLUDE = r"layers\.(0|29)\."  # two blocks keep the measured damage table small


def test_smollm2_exports_under_a_budget_and_reloads_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    prep = prepare("smollm2-135m", include=[INCLUDE])
    lo, hi = (
        prep.cost.plan_cost(uniform_plan(prep.targets, QuantFormat.parse(s), "x")).total_bytes
        for s in ("4:asym", "8:asym")
    )
    budget = (lo + hi) // 2
    parser = argparse.ArgumentParser(prog="mpq")
    add_export_parser(parser.add_subparsers(dest="command"), ["ilp"])
    out = tmp_path / "smollm2-mpq"
    args = parser.parse_args(
        ["export", "--model", "smollm2-135m", "--include", INCLUDE, "--budget",
         f"bytes={budget / 1e6}MB", "--solver", "ilp", "--formats", "4:asym,8:asym",
         "--out", str(out), "--n", "1", "--seq-len", "32"]
    )  # fmt: skip
    report = run_export(args)
    # The bytes on disk are the plan's bytes, to the byte, and within the budget.
    assert tensor_bytes_in_file(out / WEIGHTS) == report.predicted_bytes <= budget
    assert {f.bits for f in report.plan.formats.values()} == {4, 8}  # a mixed plan
    assert len(report.plan.formats) == 14
    loaded = load_export(out)
    assert loaded.tokenizer is not None
    packed = apply_plan(prep.loaded.model, report.plan, prep.targets, mode="packed")
    ids = loaded.tokenizer("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, packed(ids).logits)
