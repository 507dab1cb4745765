"""The measured latency table: measuring, the versioned JSON, and the solver-side cost array."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import tiny_llama

from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.latency import LatencyEntry, LatencyTable, latency_costs, measure_table, target_layers
from mpq.problem import build_problem
from mpq.solvers.greedy import solve_greedy
from mpq.targets import decisions, discover

FORMATS = [QuantFormat.parse(s) for s in ("4:g32", "8", "16")]


@pytest.fixture(scope="module")
def measured() -> tuple[list, LatencyTable]:
    targets = discover(tiny_llama())
    layers = target_layers(targets)
    table = measure_table(layers, FORMATS, ("reference", "cpu"), (1,), repeats=2, warmup=1)
    return targets, table


def test_table_covers_every_layer_format_backend(measured: tuple[list, LatencyTable]) -> None:
    targets, table = measured
    layers = target_layers(targets)
    assert ("embedding", (96, 64)) in layers and ("linear", (96, 64)) in layers  # tied head
    assert len(table.entries) == len(layers) * len(FORMATS) * 2
    assert all(e.seconds > 0 for e in table.entries)
    ran = {(e.format, e.backend, e.kind): e.ran for e in table.entries}
    assert ran[("8", "cpu", "linear")] == "cpu"
    assert ran[("8", "cpu", "embedding")] == "reference"


def test_json_round_trip_and_version_check(
    measured: tuple[list, LatencyTable], tmp_path: Path
) -> None:
    _, table = measured
    path = table.save(tmp_path / "lat.json")
    obj = json.loads(path.read_text())
    assert obj["_type"] == "LatencyTable" and obj["_version"] == 1
    assert LatencyTable.load(path) == table
    obj["_version"] = 2
    with pytest.raises(MpqError, match="version 2 is not supported"):
        LatencyTable.from_dict(obj)
    with pytest.raises(MpqError, match="not a latency table"):
        LatencyTable.from_dict({"_type": "BitPlan"})
    with pytest.raises(MpqError, match="duplicate"):
        LatencyTable(entries=table.entries[:1] * 2)


def test_latency_costs_sum_members_and_aliases() -> None:
    model = tiny_llama()
    targets = discover(model)
    # Synthetic table: seconds = rows * cols * bits * 1e-9, so sums can be checked by hand.
    entries = [
        LatencyEntry(kind, shape, f.spec(), "cpu", 1, shape[0] * shape[1] * f.bits * 1e-9)
        for kind, shape in target_layers(targets)
        for f in FORMATS
    ]
    table = LatencyTable(entries=tuple(entries))
    cost = build_cost_model(model, targets, "tiny")
    lat = latency_costs(table, cost, FORMATS, backend="cpu")
    groups = decisions(targets)
    assert lat.shape == (len(groups), len(FORMATS))
    for d, members in enumerate(groups.values()):
        for o, f in enumerate(FORMATS):
            want = sum(t.numel * f.bits * 1e-9 * (1 + len(t.aliases)) for t in members)
            assert lat[d, o] == pytest.approx(want)
    # build_problem takes it as the "latency" resource that every solver reads.
    limit = float(lat[:, 1].sum())
    problem = build_problem(cost, FORMATS, {"latency": limit, "bits": 12.0}, latency=lat)
    assert set(problem.costs) == {"bits", "bytes", "latency"}
    sol = solve_greedy(problem)
    assert problem.feasible(sol.choice)
    assert sol.costs["latency"] <= limit * (1 + 1e-12)
    with pytest.raises(MpqError, match="a latency budget needs measured costs"):
        build_problem(cost, FORMATS, {"latency": limit})
    with pytest.raises(MpqError, match="latency costs have shape"):
        build_problem(cost, FORMATS, {"latency": limit}, latency=lat[:, :2])
    with pytest.raises(MpqError, match=r"budget latency=.* is infeasible"):
        build_problem(cost, FORMATS, {"latency": float(lat.min(axis=1).sum()) / 2}, latency=lat)
    with pytest.raises(MpqError, match="lacks .* measurement"):
        latency_costs(table, targets, FORMATS, backend="triton")
    with pytest.raises(MpqError, match="lacks"):
        latency_costs(replace(table, entries=table.entries[1:]), targets, FORMATS, backend="cpu")
