"""``mpq bench-layers`` and the table loader ``mpq solve --latency-table`` uses.

The command runs in-process (its parser added to a bare ``mpq``-like parser, as ``mpq.cli`` does)
on a tiny local LLaMA folder. Timings themselves are never asserted; what is asserted is which
rows the table has, which backend each ran on, the exact sums the loader builds from a table with
known seconds, the errors, and that an exact ILP solve respects a latency budget (checked
against brute force).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from mpq.cli.bench_cmds import add_bench_layers_parser, check_formats, choose_backend
from mpq.cost import RESOURCES, CostModel, build_cost_model
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.latency import LatencyEntry, LatencyTable, load_latency_costs, target_layers
from mpq.pipeline import prepare
from mpq.problem import build_problem, parse_budget
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.ilp import solve_ilp
from mpq.targets import Target, decisions, discover
from mpq.testing.conformance import brute_force

FORMATS = "3,4:g32,8,16"


@pytest.fixture
def folder(tiny_folder: Path) -> Path:
    return tiny_folder


pytestmark = pytest.mark.usefixtures("mpq_env")


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same answers on a GPU machine: no CUDA, no Triton interpreter unless a test sets it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def bench(folder: Path, out: Path, *extra: str) -> int:
    """``mpq bench-layers`` with fast settings; raises what the command raises."""
    parser = argparse.ArgumentParser(prog="mpq")
    add_bench_layers_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["bench-layers", "--model", str(folder), "--out", str(out), "--repeats", "1"]
    args = parser.parse_args([*argv, "--warmup", "0", "--no-progress", *extra])
    return int(args.func(args))


# --------------------------------------------------------------------------- bench-layers


def test_bench_layers_writes_every_shape_format_and_what_ran(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lat.json"
    assert bench(folder, out, "--formats", FORMATS, "--backend", "auto", "--batch", "1,2") == 0
    table = LatencyTable.load(out)
    prep = prepare(str(folder))
    layers = target_layers(prep.targets)
    # The tied LM head is timed as a Linear of the embedding's shape.
    assert ("embedding", (30522, 32)) in layers and ("linear", (30522, 32)) in layers
    specs = FORMATS.split(",")
    want = {(k, s, f, "cpu", b) for k, s in layers for f in specs for b in (1, 2)}
    assert {e.key for e in table.entries} == want  # auto -> cpu on a CPU-only machine
    assert table.meta["requested_backend"] == "auto" and table.repeats == 1
    ran = {(e.kind, e.shape, e.format): e.ran for e in table.entries}
    assert ran[("linear", (32, 32), "8")] == "cpu"  # torch's int8 op
    assert ran[("linear", (32, 32), "3")] == "reference"  # no fused 3-bit op: reference path
    assert ran[("embedding", (30522, 32), "8")] == "reference"  # lookups never use a kernel
    text = capsys.readouterr().out
    assert "on backend cpu (asked: auto)" in text
    assert f"{len(layers)} shapes: embedding [30522, 32], linear [16, 32]" in text
    assert "table written to" in text and str(out) in text
    # The loader reads the command's table for the same model: one cost per decision x format.
    formats = [QuantFormat.parse(s) for s in specs]
    lat = load_latency_costs(out, prep.cost, formats, "cpu", batch=2)
    assert lat.shape == (len(decisions(prep.targets)), len(formats)) and (lat > 0).all()


def test_bench_layers_bad_backend_names_what_is_available(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    with pytest.raises(MpqError, match=r"--backend 'cuda' is unknown; use one of \['reference'"):
        bench(folder, out, "--backend", "cuda")
    for name in ("triton", "cupy"):
        with pytest.raises(
            MpqError,
            match=rf"--backend '{name}' is not available on this machine: .*; available here: "
            r"reference, cpu \(or auto\)",
        ):
            bench(folder, out, "--backend", name)
    with pytest.raises(MpqError, match="--device cuda: this machine has no CUDA GPU"):
        bench(folder, out, "--device", "cuda")
    assert not out.exists()


def test_backend_and_device_combinations(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_backend("auto") == ("cpu", "cpu")
    assert choose_backend("reference") == ("reference", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("triton") == ("triton", "cpu")  # the interpreter runs CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("reference") == ("reference", "cuda")
    with pytest.raises(MpqError, match="--backend cpu runs CPU tensors; use --device cpu"):
        choose_backend("cpu", "cuda")
    with pytest.raises(MpqError, match=r"'triton' runs CUDA tensors \(or CPU tensors under TRI"):
        choose_backend("triton", "cpu")
    with pytest.raises(MpqError, match="--device 'tpu' is unknown"):
        choose_backend("cpu", "tpu")


def test_bench_layers_refuses_formats_the_backend_cannot_run(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    with pytest.raises(MpqError, match=r"format 4:g48 fits none of the layers \(row lengths \[32,"):
        bench(folder, out, "--formats", "4,4:g48")
    # A shape the kernels cannot index: every case listed, with the backends that can run it.
    huge = [("linear", (2**20, 2**13)), ("linear", (64, 64))]
    with pytest.raises(
        MpqError,
        match=r"backend 'triton' cannot run what was asked: linear \[1048576, 8192\] .*8.*"
        r"offsets beyond int32; backends that can run it: reference, cpu",
    ):
        check_formats(huge, [QuantFormat(bits=8)], "triton")
    check_formats(huge, [QuantFormat(bits=8)], "cpu")  # the cpu backend can
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--batch", "0"], "--batch '0': give batch sizes >= 1"),
        (["--batch", "x"], "--batch 'x': write whole numbers"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--formats", ","], "--formats is empty"),
        (["--formats", "4,4"], "--formats repeats a format"),
        (["--formats", "9"], "bits=9 is not supported"),
        (["--dtype", "int8"], "--dtype 'int8' is unknown"),
    ],
)
def test_bench_layers_bad_arguments(
    folder: Path, tmp_path: Path, extra: list[str], match: str
) -> None:
    with pytest.raises(MpqError, match=match):
        bench(folder, tmp_path / "t.json", *extra)


def test_bench_layers_out_is_a_folder(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(MpqError, match="is a folder; give the path of the table file"):
        bench(folder, tmp_path)


# --------------------------------------------------------------------------- the loader

SPECS = ("3", "4:g32", "8")
# Known seconds per weight and format, not monotone in the width (grouped 4-bit slowest, as
# where only some formats have a fused op), so a latency budget pulls away from the bits optimum.
PER_WEIGHT = {"3": 1e-9, "4:g32": 3e-9, "8": 2e-9}


def _synthetic(
    path: Path, *, drop: str | None = None
) -> tuple[list[Target], CostModel, LatencyTable]:
    model = tiny_llama()
    targets = discover(model)
    entries = [
        LatencyEntry(kind, shape, spec, "cpu", 1, shape[0] * shape[1] * PER_WEIGHT[spec])
        for kind, shape in target_layers(targets)
        for spec in SPECS
        if spec != drop
    ]
    table = LatencyTable(entries=tuple(entries))
    table.save(path)
    return targets, build_cost_model(model, targets, "tiny"), table


def test_loader_sums_members_and_aliases_exactly(tmp_path: Path) -> None:
    path = tmp_path / "lat.json"
    targets, cost, _ = _synthetic(path)
    formats = [QuantFormat.parse(s) for s in SPECS]
    lat = load_latency_costs(path, cost, formats, "cpu", 1)
    groups = decisions(targets)
    assert lat.shape == (len(groups), len(SPECS))
    for d, members in enumerate(groups.values()):
        for o, spec in enumerate(SPECS):
            # A tied LM head (an alias) costs one more Linear of the same shape.
            want = sum(t.numel * PER_WEIGHT[spec] * (1 + len(t.aliases)) for t in members)
            assert lat[d, o] == pytest.approx(want, rel=1e-12)


def test_loader_lists_every_missing_measurement_and_the_command(tmp_path: Path) -> None:
    path = tmp_path / "lat.json"
    targets, cost, _ = _synthetic(path, drop="8")
    formats = [QuantFormat.parse(s) for s in SPECS]
    with pytest.raises(MpqError) as err:
        load_latency_costs(path, cost, formats, "cpu", 1)
    msg = str(err.value)
    layers = target_layers(targets)
    assert f"lacks {len(layers)} measurement(s) on backend 'cpu' at batch 1" in msg
    for kind, shape in layers:
        assert f"{kind} {list(shape)} at 8" in msg
    assert "Formats missing: 8." in msg
    assert (
        f"`mpq bench-layers --model tiny --formats 3,4:g32,8 --backend cpu --batch 1 --out {path}`"
        in msg
    )
    with pytest.raises(MpqError, match=r"no timings on backend 'triton' \(only \['cpu'\]\)"):
        load_latency_costs(path, cost, formats[:2], "triton", 1)
    with pytest.raises(MpqError, match=r"no timings at batch 4 \(only \[1\]\)"):
        load_latency_costs(path, cost, formats[:2], "cpu", 4)
    with pytest.raises(
        MpqError, match=r"'auto' is not a backend a table records; use one .*\['cpu'"
    ):
        load_latency_costs(path, cost, formats[:2], "auto", 1)
    with pytest.raises(MpqError, match="does not exist; run mpq bench-layers"):
        load_latency_costs(tmp_path / "none.json", cost, formats, "cpu", 1)
    path.write_text(json.dumps({"_type": "BitPlan"}))
    with pytest.raises(MpqError, match="not a latency table"):
        load_latency_costs(path, cost, formats, "cpu", 1)


def test_ilp_respects_a_latency_budget(tmp_path: Path) -> None:
    path = tmp_path / "lat.json"
    targets, cost, _ = _synthetic(path)
    formats = [QuantFormat.parse(s) for s in SPECS]
    lat = load_latency_costs(path, cost, formats, "cpu", 1)
    # Distortion falls 4x per bit, weighted differently per target.
    rng = np.random.default_rng(0)
    weight = {t.name: float(rng.uniform(0.5, 2.0)) for t in targets}
    dist = {
        t.name: {s: weight[t.name] * t.numel * 4.0 ** -QuantFormat.parse(s).bits for s in SPECS}
        for t in targets
    }
    sens = SensitivityTable("synthetic", "tiny", "none", dist)
    bits_only = build_problem(cost, formats, {"bits": 5.0}, sens, latency=lat)
    free = solve_ilp(bits_only)
    free_latency = float(lat[np.arange(len(lat)), free.choice].sum())
    # The fastest plan within the bits budget (brute force with latency as the objective).
    fastest, _ = brute_force(replace(bits_only, distortion=lat))
    assert fastest < free_latency
    limit = (fastest + free_latency) / 2  # feasible, and tighter than the bits-only optimum
    assert "latency" in RESOURCES and parse_budget(f"bits=5,latency={limit!r}")["latency"] == limit
    problem = build_problem(cost, formats, {"bits": 5.0, "latency": limit}, sens, latency=lat)
    assert problem.limits["latency"] == limit  # seconds: no unit conversion
    sol = solve_ilp(problem)
    assert sol.status == "optimal"
    spent = float(lat[np.arange(len(lat)), sol.choice].sum())
    assert spent <= limit * (1 + 1e-12) and sol.costs["latency"] == pytest.approx(spent)
    assert problem.feasible(sol.choice)
    assert not np.array_equal(sol.choice, free.choice)  # the budget binds
    best, _ = brute_force(problem)
    assert problem.distortion_of(sol.choice) == pytest.approx(best, rel=1e-9)
    assert problem.distortion_of(sol.choice) > problem.distortion_of(free.choice)
