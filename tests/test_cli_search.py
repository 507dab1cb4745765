"""`mpq solve` with the searches on measured quality and the never-worse-than-uniform guard.

On a tiny local LLaMA: each search writes a valid plan within budget whose recorded measured
KL is what `mpq eval` measures for it on the same calibration data; an adversarial table makes
the ILP pick a plan the guard replaces by uniform; a bayes study in the default sqlite storage
resumes instead of growing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpq.cli import main
from mpq.cost import build_cost_model
from mpq.models import load_model
from mpq.plan import BitPlan
from mpq.sensitivity.table import SensitivityTable
from mpq.targets import discover

torch.set_num_threads(1)

CALIB = ["--n", "1", "--seq-len", "16"]


@pytest.fixture
def folder(tiny_folder: Path) -> Path:
    return tiny_folder


pytestmark = pytest.mark.usefixtures("mpq_env")


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _solve(capsys: pytest.CaptureFixture[str], folder: Path, out: Path, *extra: str) -> str:
    argv = ["solve", "--model", str(folder), "--budget", "bits=4.5", "--formats", "3,4,8",
            *CALIB, "--out", str(out), *extra]  # fmt: skip
    rc, stdout, err = _run(capsys, argv)
    assert rc == 0, err
    return stdout


def _unseen_nll(folder: Path, plan: Path) -> float:
    from mpq.pipeline import Evaluator, prepare, task_for

    prep = prepare(str(folder))
    unseen = task_for(prep, "wiki", "calib", 1, 16, None, offset=1)
    result, _ = Evaluator(prep, unseen, progress=False)(BitPlan.load(plan))
    return float(result["nll"])


def _bits(folder: Path, plan: BitPlan) -> float:
    loaded = load_model(str(folder))
    targets = discover(loaded.model, (), ())
    plan.validate(targets)
    return build_cost_model(loaded.model, targets, loaded.model_id).plan_cost(plan).effective_bits


@pytest.mark.parametrize(
    ("solver", "extra"),
    [
        ("bayes", ["--trials", "6", "--storage", "memory"]),
        ("evolution", ["--generations", "2"]),
        ("refine", ["--rounds", "1"]),
        ("sac", ["--timesteps", "64"]),
    ],
)
def test_search_solvers_write_a_guarded_plan_within_budget(
    solver: str, extra: list[str], folder: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "plan.json"
    stdout = _solve(capsys, folder, out, "--solver", solver, "--seed", "3", *extra)
    plan = BitPlan.load(out)
    assert _bits(folder, plan) <= 4.5
    meta = plan.meta
    assert meta["search"]["seed"] == 3 and meta["search"]["metric"] == "kl"
    assert meta["guard"] in ("kept", "replaced") and "guard:" in stdout
    assert meta["measured_mixed"] >= 0 and meta["measured_uniform"] >= 0
    if meta["guard"] == "kept":
        assert plan.solver == solver and meta["measured_mixed"] <= meta["measured_uniform"]
        measured = meta["measured_mixed"]
    else:
        assert plan.solver == "uniform" and meta["replaced"] == solver
        assert len({f.spec() for f in plan.formats.values()}) == 1
        measured = meta["measured_uniform"]
    # The guard's number is the NLL of the returned plan on the calibration window after the
    # table's (which neither the table nor the search used).
    assert _unseen_nll(folder, out) == pytest.approx(measured, rel=1e-6)


def test_searches_measure_mse_formats_as_the_plan_will_be_applied(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With importance-weighted ``mse`` formats the search and the guard must measure plans
    quantized with the same statistics the returned plan records (not the unweighted error):
    the value they report is what a fresh evaluation of the written plan gives."""
    out = tmp_path / "plan.json"
    argv = ["solve", "--model", str(folder), "--budget", "bits=4.5", "--formats",
            "3:g16:mse,4:g16:mse,8", *CALIB, "--out", str(out), "--solver", "refine",
            "--rounds", "1"]  # fmt: skip
    rc, _, err = _run(capsys, argv)
    assert rc == 0, err
    plan = BitPlan.load(out)
    assert "stats" in plan.meta  # the plan records where its importance comes from
    measured = plan.meta["measured_mixed" if plan.meta["guard"] == "kept" else "measured_uniform"]
    assert _unseen_nll(folder, out) == pytest.approx(measured, rel=1e-6)
    if plan.meta["guard"] == "kept":
        from mpq.pipeline import Evaluator, prepare, task_for

        prep = prepare(str(folder))
        calib = task_for(prep, "wiki", "calib", 1, 16, None)
        kl = Evaluator(prep, calib, progress=False)(plan)[0]["kl"]
        assert kl == pytest.approx(plan.meta["measured"], rel=1e-6)  # the search's own value


def test_guard_replaces_a_mixed_plan_that_measures_worse_than_uniform(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table claiming 8 bits are free and 3 bits cost as much as 4 makes the ILP mix 3 and
    8 bits; with most layers at 3 bits it measures worse than uniform 4, which also fits."""
    loaded = load_model(str(folder))
    targets = discover(loaded.model, (), ())
    dist = {t.name: {"3": 1.0, "4": 0.99, "8": 0.0} for t in targets}
    table = tmp_path / "table.json"
    SensitivityTable("adversarial", loaded.model_id, "none", dist).save(table)
    mixed, guarded = tmp_path / "mixed.json", tmp_path / "guarded.json"
    _solve(capsys, folder, mixed, "--solver", "ilp", "--table", str(table), "--no-guard")
    stdout = _solve(capsys, folder, guarded, "--solver", "ilp", "--table", str(table))
    raw, plan = BitPlan.load(mixed), BitPlan.load(guarded)
    assert {f.spec() for f in raw.formats.values()} == {"3", "8"} and "guard" not in raw.meta
    assert plan.meta["guard"] == "replaced" and plan.meta["replaced"] == "ilp"
    assert {f.spec() for f in plan.formats.values()} == {"4"}
    assert "returning the uniform plan" in stdout
    assert _unseen_nll(folder, mixed) == pytest.approx(plan.meta["measured_mixed"])
    assert _unseen_nll(folder, guarded) < _unseen_nll(folder, mixed)


def test_bayes_study_in_default_storage_resumes_instead_of_growing(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    _solve(capsys, folder, out, "--solver", "bayes", "--trials", "5", "--no-guard")
    first = BitPlan.load(out)
    assert (tmp_path / "cache" / "optuna" / "studies.db").is_file()
    assert first.meta["trials"] == 5
    _solve(capsys, folder, out, "--solver", "bayes", "--trials", "5", "--no-guard")
    again = BitPlan.load(out)
    assert again.meta["trials"] == 5  # the study had its 5 trials: none added
    assert again.formats == first.formats
    _solve(capsys, folder, out, "--solver", "bayes", "--trials", "7", "--no-guard")
    assert BitPlan.load(out).meta["trials"] == 7


def test_table_for_another_model_and_bad_counts_are_clear_errors(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "table.json"
    SensitivityTable("x", "some/other-model", "none", {}).save(table)
    argv = ["solve", "--model", str(folder), "--budget", "4.5", "--formats", "3,4,8", *CALIB,
            "--out", str(tmp_path / "p.json")]  # fmt: skip
    rc, _, err = _run(capsys, [*argv, "--table", str(table)])
    assert rc == 2 and "computed for model 'some/other-model'" in err
    rc, _, err = _run(capsys, [*argv, "--solver", "bayes", "--trials", "0"])
    assert rc == 2 and "--trials 0 must be at least 1" in err
    rc, _, err = _run(capsys, [*argv, "--budget", "latency=0.01"])
    assert rc == 2 and "--latency-table" in err


def test_precondition_is_recorded_and_reapplied_by_eval(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`solve --precondition` records the transform and its calibration data in the plan;
    `eval` re-applies it (same scales, checked) instead of evaluating the plain model."""
    out = tmp_path / "plan.json"
    argv = ["solve", "--model", str(folder), "--budget", "bits=4.5", "--formats", "3:asym,8:asym",
            "--n", "1", "--seq-len", "64", "--out", str(out), "--solver", "ilp", "--no-guard",
            "--precondition", "scale_folding:alpha=0.5"]  # fmt: skip
    rc, _, err = _run(capsys, argv)
    assert rc == 0, err
    plan = BitPlan.load(out)
    rec = plan.meta["precondition"]
    assert rec["method"] == "scale_folding" and rec["params"]["alpha"] == 0.5
    assert rec["calib_args"] == {"data": "wiki", "split": "calib", "n": 1, "seq_len": 64,
                                 "batch_size": None}  # fmt: skip
    ev = ["eval", "--model", str(folder), "--n", "1", "--seq-len", "32"]
    rc, got, err = _run(capsys, [*ev, "--plan", str(out)])
    assert rc == 0, err
    folded = json.loads(got)
    assert folded["precondition"] == "scale_folding"
    plain_plan = tmp_path / "plain.json"
    meta = {k: v for k, v in plan.meta.items() if k != "precondition"}
    BitPlan(plan.formats, plan.model_id, plan.solver, plan.objective, dict(plan.budget),
            meta).save(plain_plan)  # fmt: skip
    rc, got, err = _run(capsys, [*ev, "--plan", str(plain_plan)])
    plain = json.loads(got)
    assert plain["precondition"] == "none" and plain["kl"] != folded["kl"]
    # A plan whose recorded scales do not reproduce is refused, not evaluated on other weights.
    tampered = tmp_path / "tampered.json"
    bad = {**plan.meta, "precondition": {**rec, "scales_sha256": "0" * 16}}
    BitPlan(plan.formats, plan.model_id, plan.solver, plan.objective, dict(plan.budget),
            bad).save(tampered)  # fmt: skip
    rc, _, err = _run(capsys, [*ev, "--plan", str(tampered)])
    assert rc == 2 and "gave other scales" in err


def test_the_parser_imports_no_torch() -> None:
    """`mpq --help` (and every subcommand's parser: export, bench-layers) stays light."""
    import subprocess
    import sys

    code = (
        "import sys, mpq.cli; mpq.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
