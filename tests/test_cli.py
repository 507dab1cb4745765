"""The `mpq` command: bad input exits 2 with one ``error:`` line (never a traceback), nothing is
written half, and the success paths print what the library computes.

Everything runs in-process through :func:`mpq.cli.main` on a tiny local LLaMA folder (vocab
30522 so the bundled MiniLM tokenizer fits it).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_folder

from mpq.cli import main
from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.models import LoadedModel, load_model, sample_input
from mpq.plan import BitPlan, uniform_plan
from mpq.targets import Target, decisions, discover

torch.set_num_threads(1)

SUPPORTED = "[2, 3, 4, 5, 6, 7, 8]"


@dataclass
class Tiny:
    folder: Path
    loaded: LoadedModel
    targets: list[Target]

    @property
    def model(self) -> str:
        return str(self.folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        folder = build_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama")
        loaded = load_model(str(folder))
    # The default exclude of a local folder is none.
    assert loaded.default_exclude == ()
    return Tiny(folder, loaded, discover(loaded.model, (), loaded.default_exclude))


pytestmark = pytest.mark.usefixtures("mpq_env")


def run_ok(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "error:" not in err
    return out


def run_err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run a failing command; check exit 2, one ``error:`` line, no traceback; the message."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    starts = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(starts) == 1, err
    return err[err.index("error:") :]


def write_plan(path: Path, obj: Any) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def eval_args(tiny: Tiny, plan: str, *extra: str) -> list[str]:
    return ["eval", "--model", tiny.model, "--plan", plan, "--data", "wiki", "--n", "1",
            "--seq-len", "16", *extra]  # fmt: skip


def solve_args(tiny: Tiny, out: Path, *extra: str) -> list[str]:
    return ["solve", "--model", tiny.model, "--solver", "uniform", "--out", str(out), *extra]


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("argv", [["--help"], ["solve", "--help"]])
def test_help_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mpq")
    if argv[0] == "solve":
        assert "--budget" in out and "--solver" in out


def test_argparse_error_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["solve", "--budget", "4", "--out", "x.json", "--solver", "nosuch"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nosuch'" in err and "Traceback" not in err


# --------------------------------------------------------------------------- model


def test_unknown_model_names_valid_ids(capsys: pytest.CaptureFixture[str]) -> None:
    msg = run_err(capsys, ["inspect", "--model", "no-such-model"])
    assert "'no-such-model'" in msg
    for model_id in ("smollm2-135m", "minilm-l6", "mobilenet-v2"):
        assert model_id in msg
    assert "local Hugging Face model folder" in msg


# --------------------------------------------------------------------------- plans


def test_plan_with_unknown_layer(tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    base = uniform_plan(tiny.targets, QuantFormat(4), tiny.loaded.model_id)
    bad = "model.layers.9.mlp.down_proj"
    assert bad not in base.formats
    plan = BitPlan(formats={**base.formats, bad: QuantFormat(4)}, model_id=base.model_id)
    path = plan.save(tmp_path / "extra.json")
    msg = run_err(capsys, eval_args(tiny, str(path)))
    assert f"unknown layer {bad!r}" in msg
    assert "model.layers.1.mlp.down_proj" in msg  # the close match is suggested


def test_plan_missing_a_target(tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    dropped = "model.layers.1.mlp.down_proj"
    formats = {t.name: QuantFormat(4) for t in tiny.targets if t.name != dropped}
    path = BitPlan(formats=formats, model_id=tiny.loaded.model_id).save(tmp_path / "short.json")
    msg = run_err(capsys, eval_args(tiny, str(path)))
    assert "no format for 1 target(s)" in msg
    assert dropped in msg


def test_plan_splitting_a_tie_group(tiny: Tiny, tmp_path: Path, capsys):
    formats = {t.name: QuantFormat(4) for t in tiny.targets}
    formats["model.layers.0.self_attn.k_proj"] = QuantFormat(8)
    path = BitPlan(formats=formats, model_id=tiny.loaded.model_id).save(tmp_path / "tie.json")
    msg = run_err(capsys, eval_args(tiny, str(path)))
    assert "tie group 'model.layers.0.self_attn.qkv' must share one format" in msg
    assert "['4', '8']" in msg
    assert "layers.1" not in msg  # only the split group is named


def test_uniform_bits_out_of_range(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    msg = run_err(capsys, eval_args(tiny, "uniform:9"))
    assert "bits=9 is not supported" in msg
    assert SUPPORTED in msg and "16" in msg


def test_json_plan_bits_out_of_range(tiny: Tiny, tmp_path: Path, capsys) -> None:
    obj = uniform_plan(tiny.targets, QuantFormat(4), tiny.loaded.model_id).to_dict()
    name = tiny.targets[4].name
    obj["_data"]["formats"][name]["bits"] = 1
    msg = run_err(capsys, eval_args(tiny, write_plan(tmp_path / "b1.json", obj)))
    assert f"plan entry {name!r}" in msg
    assert "bits=1 is not supported" in msg and SUPPORTED in msg


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("{not json", "plan is not valid JSON"),
        ({"_type": "BitPlan", "_version": 99, "_data": {}}, "plan version 99 is not supported"),
        ({"_type": "SensitivityTable", "_version": 1, "_data": {}}, "not a plan"),
        ([1, 2, 3], "not a plan"),
        ({"_type": "BitPlan", "_version": 1, "_data": {"model_id": "x"}}, '"_data.formats"'),
    ],
    ids=["bad-json", "version-99", "wrong-type", "json-list", "no-formats"],
)
def test_malformed_plan_files(
    content: Any, expect: str, tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = run_err(capsys, eval_args(tiny, write_plan(tmp_path / "p.json", content)))
    assert expect in msg


def test_plan_neither_file_nor_spec(tiny: Tiny, tmp_path: Path, capsys) -> None:
    msg = run_err(capsys, eval_args(tiny, str(tmp_path / "missing.json")))
    assert "neither a file nor a uniform spec" in msg and "uniform:4" in msg


def test_json_plan_float_bits_is_a_clear_error(tiny: Tiny, tmp_path: Path, capsys) -> None:
    obj = uniform_plan(tiny.targets, QuantFormat(4), tiny.loaded.model_id).to_dict()
    obj["_data"]["formats"][tiny.targets[4].name]["bits"] = 4.0
    msg = run_err(capsys, eval_args(tiny, write_plan(tmp_path / "f.json", obj)))
    assert "bits" in msg


@pytest.mark.parametrize("key,value", [("budget", [1, 2]), ("meta", "abc")])
def test_json_plan_non_object_budget_or_meta(
    key: str, value: Any, tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obj = uniform_plan(tiny.targets, QuantFormat(4), tiny.loaded.model_id).to_dict()
    obj["_data"][key] = value
    msg = run_err(capsys, eval_args(tiny, write_plan(tmp_path / "m.json", obj)))
    assert key in msg


def test_binary_plan_file_is_a_clear_error(tiny: Tiny, tmp_path: Path, capsys) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00\x81 not text")
    msg = run_err(capsys, eval_args(tiny, str(path)))
    assert "plan" in msg


# --------------------------------------------------------------------------- budgets


def _smallest_bits_at_3(targets: list[Target]) -> float:
    """Per row: ceil(cols * 3 / 32) 32-bit words of codes + one fp16 scale; over target numel."""
    bits = numel = 0
    for t in targets:
        rows, cols = t.shape[0], math.prod(t.shape[1:])
        bits += rows * (math.ceil(cols * 3 / 32) * 32 + 16)
        numel += rows * cols
    return bits / numel


def test_infeasible_budget_gives_smallest_bits(tiny: Tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plans" / "plan.json"
    msg = run_err(capsys, solve_args(tiny, out, "--budget", "bits=1.0", "--formats", "3,4"))
    assert "infeasible" in msg
    m = re.search(r"smallest achievable is bits=([0-9.eE+-]+);", msg)
    assert m is not None, msg
    expected = _smallest_bits_at_3(tiny.targets)
    assert 3.2 < expected < 3.5  # 112 bits per 32-wide row, 208 per 64-wide row
    assert m.group(1) == f"{expected:.6g}"
    assert not out.parent.exists()


def test_infeasible_budget_greedy_writes_nothing(tiny: Tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plans" / "plan.json"
    argv = solve_args(tiny, out, "--budget", "bits=3.0", "--formats", "3,4")
    argv[argv.index("uniform")] = "greedy"
    msg = run_err(capsys, [*argv, "--n", "1", "--seq-len", "16"])
    assert f"bits={_smallest_bits_at_3(tiny.targets):.6g}" in msg
    assert not out.parent.exists()


@pytest.mark.parametrize(
    ("budget", "expect"),
    [
        ("bits=20", "is above full precision (bits=16 "),
        ("bits=abc", "budget 'bits=abc': 'abc' is not a number"),
        ("watts=3", "unknown resource 'watts'; use one of ['bits', 'bytes', 'bops', 'latency']"),
        ("bits=-1", "must be positive"),
        (",", "is empty"),
    ],
)
def test_bad_budget(budget: str, expect: str, tiny: Tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plans" / "plan.json"
    msg = run_err(capsys, solve_args(tiny, out, "--budget", budget, "--formats", "3,4"))
    assert expect in msg
    assert not out.parent.exists()


def test_nan_budget_is_not_a_number(tiny: Tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plans" / "plan.json"
    msg = run_err(capsys, solve_args(tiny, out, "--budget", "bits=nan", "--formats", "3,4"))
    assert "not a" in msg and "infeasible" not in msg
    assert not out.parent.exists()


def test_bad_candidate_format(tiny: Tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plans" / "plan.json"
    msg = run_err(capsys, solve_args(tiny, out, "--budget", "4", "--formats", "3,x4"))
    assert "format 'x4' must start with the bit-width" in msg
    assert not out.parent.exists()


def test_out_is_a_directory(tiny: Tiny, tmp_path: Path, capsys) -> None:
    msg = run_err(capsys, solve_args(tiny, tmp_path, "--budget", "4.5", "--formats", "3,4,8"))
    assert str(tmp_path) in msg or "director" in msg


# --------------------------------------------------------------------------- data


def test_zero_windows(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    argv = eval_args(tiny, "uniform:4")
    argv[argv.index("--n") + 1] = "0"
    msg = run_err(capsys, argv)
    assert "n=0" in msg and "positive number" in msg


def test_seq_len_longer_than_the_model_allows(tiny: Tiny, capsys) -> None:
    argv = ["eval", "--model", tiny.model, "--plan", "uniform:4", "--data", "bbc",
            "--split", "heldout", "--n", "1", "--seq-len", "10000000"]  # fmt: skip
    msg = run_err(capsys, argv)
    assert "maximum of 2048 positions" in msg and "--seq-len 2048 or less" in msg


def test_zero_seq_len(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    argv = eval_args(tiny, "uniform:4")
    argv[argv.index("--seq-len") + 1] = "0"
    msg = run_err(capsys, argv)
    assert "seq_len" in msg


def test_unknown_data_names_valid_ids(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    argv = eval_args(tiny, "uniform:4")
    argv[argv.index("--data") + 1] = "nosuch"
    msg = run_err(capsys, argv)
    assert "unknown text data id 'nosuch'; choose one of wiki, bbc" in msg


def test_unknown_split(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    msg = run_err(capsys, eval_args(tiny, "uniform:4", "--split", "nosplit"))
    assert "unknown split 'nosplit'" in msg and "calib, heldout" in msg


# --------------------------------------------------------------------------- success


def test_inspect_lists_targets_and_ties(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_ok(capsys, ["inspect", "--model", tiny.model])
    names = [t.name for t in tiny.targets]
    assert len(names) == 15  # tied embedding/head + 2 layers x 7 linears
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for t in tiny.targets:
        assert t.name in rows, t.name
        assert str(list(t.shape)) in rows[t.name]
        assert (t.tie or "-") in rows[t.name].split()
    assert "(also lm_head)" in rows["model.embed_tokens"]
    ties = sorted({t.tie for t in tiny.targets if t.tie})
    assert ties == [
        "model.layers.0.mlp.gate_up",
        "model.layers.0.self_attn.qkv",
        "model.layers.1.mlp.gate_up",
        "model.layers.1.self_attn.qkv",
    ]
    assert "15 targets, 4 tie groups" in out


def _eval_json(tiny: Tiny, capsys: pytest.CaptureFixture[str], plan: str) -> dict[str, Any]:
    argv = ["eval", "--model", tiny.model, "--plan", plan, "--data", "wiki", "--n", "2",
            "--seq-len", "32"]  # fmt: skip
    result: dict[str, Any] = json.loads(run_ok(capsys, argv))
    return result


def test_eval_prints_metrics_and_cost(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    r8 = _eval_json(tiny, capsys, "uniform:8")
    r2 = _eval_json(tiny, capsys, "uniform:2")
    assert r8["n_units"] == 2 and r8["n_positions"] == 2 * 31
    assert 0.0 <= r8["kl"] < r2["kl"]
    cost = build_cost_model(
        tiny.loaded.model, tiny.targets, tiny.loaded.model_id, sample_input(tiny.loaded)
    )
    for bits, r in ((8, r8), (2, r2)):
        report = cost.plan_cost(uniform_plan(tiny.targets, QuantFormat(bits), "x"))
        assert r["effective_bits"] == report.effective_bits
        assert r["total_bytes"] == report.total_bytes
    # 8-bit per-channel: 8 bits per weight + one fp16 scale per row.
    rows = sum(t.shape[0] for t in tiny.targets)
    numel = sum(t.numel for t in tiny.targets)
    assert r8["effective_bits"] == pytest.approx(8 + 16 * rows / numel, rel=1e-12)


def test_solve_greedy_writes_a_valid_plan(tiny: Tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan.json"
    argv = ["solve", "--model", tiny.model, "--solver", "greedy", "--budget", "bits=4.5",
            "--formats", "3,4,8", "--n", "1", "--seq-len", "32", "--out", str(out),
            "--no-guard"]  # fmt: skip
    stdout = run_ok(capsys, argv)
    assert f"plan written to {out}" in stdout
    plan = BitPlan.load(out)
    plan.validate(tiny.targets)
    assert plan.solver == "greedy" and dict(plan.budget) == {"bits": 4.5}
    assert list(plan.formats) == [t.name for t in tiny.targets]
    assert {f.spec() for f in plan.formats.values()} <= {"3", "4", "8"}
    for group, members in decisions(tiny.targets).items():
        assert len({plan[t.name] for t in members}) == 1, group
    cost = build_cost_model(tiny.loaded.model, tiny.targets, tiny.loaded.model_id)
    bits = cost.plan_cost(plan).effective_bits
    assert bits <= 4.5
    assert f"effective bits {bits:.4f}" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["plan.json"]


def test_solve_with_anchor_and_stats_records_the_statistics(
    tiny: Tiny, tmp_path: Path, capsys
) -> None:
    """``--stats`` is where the mse formats' importance comes from (recorded in the plan);
    ``--anchor`` measures one format per layer; a bad ``--stats`` is one clear error."""
    out = tmp_path / "plan.json"
    argv = ["solve", "--model", tiny.model, "--solver", "ilp", "--budget", "bits=6.0",
            "--formats", "3:g16:mse,4:g16:dq:mse,8:g16", "--n", "1", "--seq-len", "32",
            "--stats", "wiki:calib:2x24", "--anchor", "8:g16", "--out", str(out),
            "--no-guard"]  # fmt: skip
    run_ok(capsys, argv)
    plan = BitPlan.load(out)
    plan.validate(tiny.targets)
    assert (plan.meta["stats"]["n"], plan.meta["stats"]["seq_len"]) == (2, 24)
    assert {f.spec() for f in plan.formats.values()} <= {"3:g16:mse", "4:g16:dq:mse", "8:g16"}
    bad = [str(tmp_path / "b.json") if a == str(out) else a for a in argv]
    bad[bad.index("wiki:calib:2x24")] = "wiki:heldout:2x24"
    assert "calibration data" in run_err(capsys, bad)


def test_library_raises_mpq_error_not_exit(tiny: Tiny) -> None:
    """The same failures are MpqError from the library (the CLI is only a wrapper)."""
    from mpq.plan import parse_plan_arg

    with pytest.raises(MpqError, match="bits=9 is not supported"):
        parse_plan_arg("uniform:9", tiny.targets, tiny.loaded.model_id)


def test_config_search_options_are_search_option_fields() -> None:
    """config.SOLVE_OPTIONS (torch-free) names SearchOptions fields with their types."""
    import dataclasses

    from mpq.config import SOLVE_OPTIONS
    from mpq.solvers.options import SearchOptions

    fields = {f.name: f.type for f in dataclasses.fields(SearchOptions)}
    for key, kind in SOLVE_OPTIONS.items():  # an optional field (None: its default) takes kind
        assert key in fields and fields[key] in (kind.__name__, f"{kind.__name__} | None"), key


@pytest.mark.parametrize("solver", ["ilp", "pareto", "closed_form"])
def test_solve_with_exact_and_convex_solvers(
    solver: str, tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    argv = ["solve", "--model", tiny.model, "--solver", solver, "--budget", "bits=4.5"]
    said = run_ok(
        capsys, [*argv, "--formats", "3,4,8", "--n", "1", "--seq-len", "16", "--out", str(out)]
    )
    plan = BitPlan.load(out)
    plan.validate(tiny.targets)
    cost = build_cost_model(tiny.loaded.model, tiny.targets, tiny.loaded.model_id)
    assert cost.plan_cost(plan).effective_bits <= 4.5
    # The guard scored on the calibration windows after the table's (log ppl): the uniform
    # plans on both sides of the budget are named, with their measured NLL.
    m = plan.meta
    assert m["guard"] in ("kept", "replaced") and "unseen calibration tokens" in said
    assert m["uniform_below"] == "4" and m["uniform_above"] == "8"
    assert m["measured_below"] > 0 and m["measured_above"] > 0  # NLL of a random tiny model
    if "equal_quality" in m:
        assert m["saved"] == pytest.approx(m["equal_quality"] - cost.plan_cost(plan).effective_bits)


def test_bounds_reports_feasible_range_and_uniform_points(
    tiny: Tiny, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bounds", "--model", tiny.model, "--formats", "3,4,8"]
    out = run_ok(capsys, [*argv, "--budgets", "bits=3.6;bits=4.5", "--n", "1", "--seq-len", "16"])
    cost = build_cost_model(tiny.loaded.model, tiny.targets, tiny.loaded.model_id)
    least = cost.plan_cost(uniform_plan(tiny.targets, QuantFormat(3), "x")).effective_bits
    assert f"{least:.4g}"[:4] in out
    for spec in ("3", "4", "8"):
        assert spec in out


@pytest.mark.parametrize("estimator", ["fisher", "taylor", "measured"])
def test_sensitivity_command_writes_a_table_and_a_plot(
    estimator: str, tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mpq.sensitivity.table import SensitivityTable

    out = tmp_path / "table.json"
    argv = ["sensitivity", "--model", tiny.model, "--estimator", estimator, "--formats", "3,8"]
    run_ok(capsys, [*argv, "--n", "2", "--seq-len", "16", "--out", str(out)])
    table = SensitivityTable.load(out)
    assert set(table.distortions) == {t.name for t in tiny.targets}
    # Every estimator's distortion model ranks 3 bits as no better than 8 bits on any layer,
    # within the estimator's noise floor: 4 standard errors where it measures them (measured:
    # two windows), plus a relative float64 tolerance for estimators that measure none.
    for name, row in table.distortions.items():
        se = table.distortion_se.get(name, {})
        floor = 4 * (se.get("3", 0.0) + se.get("8", 0.0)) + 1e-9 * abs(row["8"])
        assert row["3"] >= row["8"] - floor, (name, row, se)
    if estimator == "measured":
        assert set(table.distortion_se) == set(table.distortions)
    rows = table.distortions.values()
    assert sum(row["3"] for row in rows) > sum(row["8"] for row in rows)
    png = tmp_path / "s.png"
    run_ok(capsys, ["plot-sensitivity", str(out), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_bad_param_is_a_clear_error(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sensitivity", "--model", tiny.model, "--estimator", "fisher", "--param", "nonsense=1"]
    msg = run_err(capsys, [*argv, "--out", str(tmp_path / "t.json")])
    assert "nonsense" in msg
    assert not (tmp_path / "t.json").exists()


def test_no_default_exclude_is_an_empty_exclude_list_in_any_order() -> None:
    """--no-default-exclude: the model's default excludes (SmolLM2: embed_tokens, lm_head)
    are off; explicit --exclude patterns still apply, before or after the flag."""
    from mpq.cli.main import build_parser

    def exclude(*argv: str) -> list[str] | None:
        return build_parser().parse_args(["inspect", *argv]).exclude

    assert exclude() is None  # prepare() uses the model's defaults
    assert exclude("--no-default-exclude") == []
    assert exclude("--no-default-exclude", "--exclude", "mlp") == ["mlp"]
    assert exclude("--exclude", "mlp", "--no-default-exclude") == ["mlp"]
