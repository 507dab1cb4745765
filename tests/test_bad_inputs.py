"""Every bad input, one table: exit 2, exactly one ``error:`` line, no traceback, nothing
half-written (the working folder is byte-identical afterwards and no temporary is left).

The table holds the kinds of issue 13 (tracebacks and silent acceptances) and kinds that
already worked, so they stay working. Each row: an id, the argv (built from a few fixture
files), and a fragment the message must contain (the problem or the fix).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_folder

from mpq.cli import main

torch.set_num_threads(1)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("models"))


def make_models(root: Path) -> dict[str, Path]:
    """The tiny LLaMA, a copy whose config disagrees with its weights, a pickle-only copy,
    an export folder and a sensitivity table with a negative score."""
    tiny = build_tiny_folder(root / "tiny")
    shape = root / "shape"
    shutil.copytree(tiny, shape)
    cfg = json.loads((shape / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (shape / "config.json").write_text(json.dumps(cfg))
    pick = root / "pickle"
    shutil.copytree(tiny, pick)
    (pick / "model.safetensors").unlink()
    (pick / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Evil()}))
    export = root / "export"
    export.mkdir()
    (export / "plan.json").write_text("{}")
    table = root / "table.json"
    table.write_text(
        json.dumps(
            {
                "_type": "SensitivityTable",
                "_version": 1,
                "_data": {
                    "estimator": "measured",
                    "model_id": str(tiny.resolve()),
                    "data_id": "x",
                    "scores": {"model.layers.0.mlp.up_proj": -1.0},
                    "distortions": {},
                },
            }
        )
    )
    pkl = root / "table.pkl"
    pkl.write_bytes(pickle.dumps({"a": 1}) + b"\xff\xfe")
    return {"tiny": tiny, "shape": shape, "pickle": pick, "export": export, "table": table,
            "pkl": pkl}  # fmt: skip


def _toml_value(v: object) -> str:
    """JSON's strings, numbers, booleans and arrays are TOML too; tables become inline."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def _write_config(path: Path, **patch: object) -> str:
    body: dict[str, object] = {
        "name": "c",
        "model": str(patch.pop("model")),
        "formats": ["4", "8"],
        "estimators": ["measured"],
        **patch,
    }
    calib = body.pop("_calib", {"data": "wiki", "n": 1, "seq_len": 16})
    lines = [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
    lines.append("[calibration]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in calib.items()]  # type: ignore[union-attr]
    lines += ["[evaluation]", 'data = ["wiki"]', "n = 1", "seq_len = 16"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


Case = Callable[[dict[str, Path], Path], list[str]]


def _eval(m: dict[str, Path], *extra: str, model: str = "tiny") -> list[str]:
    return ["eval", "--model", str(m[model]), "--plan", "fp", "--n", "1", "--seq-len", "16",
            *extra]  # fmt: skip


def _solve(
    m: dict[str, Path],
    w: Path,
    *extra: str,
    out: str = "",
    solver: str = "uniform",
    budget: str = "bits=5",
) -> list[str]:
    return ["solve", "--model", str(m["tiny"]), "--solver", solver, "--budget", budget,
            "--out", out or str(w / "plan.json"), "--n", "1", "--seq-len", "16",
            *extra]  # fmt: skip


def _compare(m: dict[str, Path], w: Path, **patch: object) -> list[str]:
    cfg = _write_config(w.parent / "cfg.toml", **{"model": m["tiny"], **patch})
    return ["compare", "--config", cfg, "--out", str(w / "reports")]


def _existing_file(w: Path, name: str, text: str) -> Path:
    (w / name).write_text(text)
    return w / name


CASES: list[tuple[str, Case, str]] = [
    # ---- issue 13, item 3: tracebacks before
    ("weights-of-another-shape", lambda m, w: _eval(m, model="shape"), "shapes its config"),
    ("pickle-checkpoint", lambda m, w: _eval(m, model="pickle"), "pickled checkpoint"),
    ("seq-len-beyond-model", lambda m, w: [*_eval(m)[:-2], "--seq-len", "100000"], "maximum"),
    ("batch-size-negative",
     lambda m, w: ["sensitivity", "--model", str(m["tiny"]), "--estimator", "pruning",
                   "--out", str(w / "t.json"), "--n", "1", "--seq-len", "16",
                   "--batch-size", "-2"], "batch_size=-2"),
    ("batch-size-zero",
     lambda m, w: ["sensitivity", "--model", str(m["tiny"]), "--estimator", "pruning",
                   "--out", str(w / "t.json"), "--n", "1", "--seq-len", "16",
                   "--batch-size", "0"], "batch_size=0"),
    ("table-is-a-pickle", lambda m, w: _solve(m, w, "--table", str(m["pkl"]), solver="greedy"),
     "not text"),
    ("out-under-a-file",
     lambda m, w: _solve(m, w, out=str(_existing_file(w, "f.txt", "x") / "plan.json")),
     "is a file, not a folder"),
    ("out-unwritable", lambda m, w: _solve(m, w, out="/proc/1/plan.json"), "cannot"),
    ("export-out-current-folder",
     lambda m, w: ["export", "--model", str(m["tiny"]), "--format", "mpq", "--solver",
                   "uniform", "--budget", "bits=5", "--out", ".", "--force"],
     "not a folder mpq can"),
    ("export-out-parent-of-cwd",
     lambda m, w: ["export", "--model", str(m["tiny"]), "--format", "mpq", "--solver",
                   "uniform", "--budget", "bits=5", "--out", str(w.parent), "--force"],
     "current folder"),
    ("plan-is-an-export-folder", lambda m, w: _eval(m)[:3] + ["--plan", str(m["export"])],
     "is a folder"),
    ("config-seeds-int", lambda m, w: _compare(m, w, seeds=5), "`seeds` must be a list"),
    ("config-seq-len-string",
     lambda m, w: _compare(m, w, _calib={"data": "wiki", "seq_len": "sixteen"}), "seq_len"),
    ("config-solve-string", lambda m, w: _compare(m, w, solve="greedy"), "[[solve]] tables"),
    ("config-formats-string", lambda m, w: _compare(m, w, formats="4,8"), "must be a list"),
    ("config-budgets-string",
     lambda m, w: _compare(m, w, solve=[{"solver": "greedy", "budgets": "bits=5.0"}]),
     "must be a list"),
    ("config-estimators-string", lambda m, w: _compare(m, w, estimators="fisher"),
     "must be a list"),
    # ---- issue 13, item 4: silently accepted before
    ("format-conflicting-tokens", lambda m, w: _solve(m, w, "--formats", "4:g32:g64"),
     "sets group_size twice"),
    ("config-ties-string", lambda m, w: _compare(m, w, ties="no"), "`ties` must be true/false"),
    ("config-include-string", lambda m, w: _compare(m, w, include="mlp"), "must be a list"),
    ("config-name-parent", lambda m, w: _compare(m, w, name="../x"), "plain file name"),
    ("config-name-absolute", lambda m, w: _compare(m, w, name="/tmp/x"), "plain file name"),
    ("config-unknown-key-close-match", lambda m, w: _compare(m, w, estimatorz=["fisher"]),
     "did you mean 'estimators'"),
    ("config-empty-grid", lambda m, w: _compare(m, w, formats=[]), "is empty"),
    ("config-bad-model-writes-nothing",
     lambda m, w: _compare(m, w, model=str(w / "nope")), "unknown model"),
    ("table-negative-score",
     lambda m, w: _solve(m, w, "--table", str(m["table"]), solver="greedy"), "negative"),
    ("solve-out-over-a-non-plan-file",
     lambda m, w: _solve(m, w, out=str(_existing_file(w, "notes.txt", "keep me"))),
     "not a plan file"),
    ("n-beyond-the-split", lambda m, w: [*_eval(m)[:6], "100000", "--seq-len", "64"],
     "ask for at most n="),
    # ---- kinds that already gave one clear line (kept working)
    ("unknown-model", lambda m, w: ["inspect", "--model", "no-such-model"], "unknown model"),
    ("bad-budget", lambda m, w: _solve(m, w, budget="watts=3"), "unknown resource"),
    ("bits-out-of-range", lambda m, w: _eval(m)[:3] + ["--plan", "uniform:9"], "bits=9"),
    ("zero-windows", lambda m, w: [*_eval(m)[:6], "0", "--seq-len", "16"], "n=0"),
    ("unknown-data", lambda m, w: _eval(m, "--data", "novels"), "novels"),
    ("out-is-a-folder", lambda m, w: _solve(m, w, out=str(w)), "is a folder"),
    ("malformed-plan", lambda m, w: _eval(m)[:3] + ["--plan",
                                                    str(_existing_file(w, "p.json", "{x"))],
     "not valid JSON"),
    ("trials-zero", lambda m, w: _solve(m, w, "--trials", "0"), "--trials 0"),
    ("unknown-estimator-param",
     lambda m, w: ["sensitivity", "--model", str(m["tiny"]), "--estimator", "pruning",
                   "--param", "colour=3", "--out", str(w / "t.json")], "no parameter"),
    ("missing-config", lambda m, w: ["compare", "--config", str(w / "none.toml")],
     "does not exist"),
    ("export-over-existing-without-force",
     lambda m, w: ["export", "--model", str(m["tiny"]), "--format", "mpq", "--solver",
                   "uniform", "--budget", "bits=5", "--out", str(m["export"])],
     "already exists"),
]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize(("case", "expect"), [(c, e) for _, c, e in CASES],
                         ids=[i for i, _, _ in CASES])  # fmt: skip
def test_bad_input_gives_one_error_line(
    case: Case,
    expect: str,
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPQ_THREADS", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = case(models, work)
    before = _snapshot(work)
    models_before = _snapshot(models["tiny"].parent)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert expect in lines[0], lines[0]
    assert _snapshot(work) == before  # nothing written, nothing half-written, nothing replaced
    assert _snapshot(models["tiny"].parent) == models_before
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".lock")]
    assert leftovers == []


def test_ctrl_c_prints_one_line_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mpq.cli
    import mpq.cli.model_cmds

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(mpq.cli.model_cmds, "cmd_inspect", interrupted)
    capsys.readouterr()
    assert main(["inspect"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("error: interrupted") and "rerun" in line


def test_bad_mpq_threads_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MPQ_THREADS", "many")
    capsys.readouterr()
    assert main(["inspect", "--model", "no-such"]) == 2
    assert capsys.readouterr().err.count("error:") == 1
