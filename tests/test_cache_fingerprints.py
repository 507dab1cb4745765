"""Caches never serve a stale or wrong result: keys hold the weights actually loaded and the
data; entries are checked on read; non-finite results are never stored.

The oracle for "not stale" is a fresh evaluation with an empty cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_folder
from safetensors.torch import load_file, save_file

from mpq.cache import data_fingerprint, read_entry, weights_fingerprint, write_entry
from mpq.cli import main
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.models import (
    CHECKSUMS,
    _record_checksums,
    converted_problem,
    load_model,
    write_converted,
)
from mpq.pipeline import Evaluator, prepare, task_for
from mpq.plan import uniform_plan

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def folder(base_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPQ_THREADS", "1")
    dst = tmp_path / "model"
    shutil.copytree(base_folder, dst)
    return dst


def _rewrite_weights(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    """Other values of the same shapes under the same path (what a re-training does)."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    save_file({k: fn(k, v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _eval_kl(folder: Path, capsys: pytest.CaptureFixture[str], plan: str = "uniform:3") -> float:
    capsys.readouterr()
    argv = ["eval", "--model", str(folder), "--plan", plan, "--n", "1", "--seq-len", "16"]
    assert main(argv) == 0
    return float(json.loads(capsys.readouterr().out)["kl"])


def test_eval_cache_follows_the_weights_under_the_same_path(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    first = _eval_kl(folder, capsys)
    assert _eval_kl(folder, capsys) == first  # served from the cache
    torch.manual_seed(1)
    _rewrite_weights(folder, lambda k, v: v * 3.0 if v.dim() == 2 else v)
    changed = _eval_kl(folder, capsys)
    # oracle: the same evaluation with an empty cache
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "fresh-cache"))
    fresh = _eval_kl(folder, capsys)
    assert changed == fresh
    assert abs(changed - first) > 1e-3 * max(first, 1e-9)


def test_eval_cache_follows_the_data(folder: Path) -> None:
    prep = prepare(str(folder))
    a = task_for(prep, "wiki", "calib", 1, 16, None)
    b = task_for(prep, "wiki", "calib", 1, 16, None)
    assert data_fingerprint(a.batches, a.labels) == data_fingerprint(b.batches, b.labels)
    b.batches[0] = b.batches[0].clone()
    b.batches[0][0, 3] += 1  # one other token, same task key
    assert a.key == b.key
    assert data_fingerprint(a.batches, a.labels) != data_fingerprint(b.batches, b.labels)
    ea, eb = Evaluator(prep, a, progress=False), Evaluator(prep, b, progress=False)
    assert ea.fingerprint() != eb.fingerprint()


def test_weights_fingerprint_sees_one_value(folder: Path) -> None:
    model = load_model(str(folder)).model
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[7, 3] += 1e-3
    assert weights_fingerprint(model) != before


def test_non_finite_fp_logits_are_an_error_and_nothing_is_cached(
    folder: Path, tmp_path: Path, capsys
) -> None:
    _rewrite_weights(
        folder,
        lambda k, v: v.index_fill(0, torch.tensor([0]), float("nan")) if "q_proj" in k else v,
    )
    capsys.readouterr()
    rc = main(["eval", "--model", str(folder), "--plan", "fp", "--n", "1", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.count("error:") == 1 and "non-finite logits" in err
    assert not list((tmp_path / "cache").rglob("evals/**/*.json"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: "",
        lambda e: "{trunc",
        lambda e: json.dumps(
            {**e, "value": {**e["value"], "metrics": {**e["value"]["metrics"], "kl": 123.0}}}
        ),
        lambda e: json.dumps({**e, "key": "x"}),
        lambda e: json.dumps({"metrics": {"kl": 1.0}, "units": {}, "seconds": 0.0}),
    ],
    ids=["empty", "truncated", "edited-kl", "other-key", "old-layout"],
)
def test_bad_eval_entry_is_logged_and_recomputed(
    folder: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture, damage
) -> None:
    first = _eval_kl(folder, capsys)
    (entry_path,) = [
        p for p in (tmp_path / "cache" / "evals").rglob("*.json") if "fp32" not in p.name
    ]
    entry_path.write_text(damage(json.loads(entry_path.read_text())))
    with caplog.at_level(logging.WARNING, logger="mpq.cache"):
        again = _eval_kl(folder, capsys)
    assert again == first
    assert any("ignoring cache entry" in r.getMessage() for r in caplog.records)
    key = json.loads(entry_path.read_text())["key"]
    assert read_entry(entry_path, key, allow_nan=lambda p: p.endswith("_se")) is not None


def test_non_finite_values_are_never_stored(tmp_path: Path) -> None:
    with pytest.raises(MpqError, match="non-finite"):
        write_entry(tmp_path / "e.json", "k", {"kl": float("nan")})
    assert not (tmp_path / "e.json").exists()
    write_entry(tmp_path / "e.json", "k", {"kl_se": float("nan")}, lambda p: p.endswith("_se"))
    assert read_entry(tmp_path / "e.json", "k", allow_nan=lambda p: p.endswith("_se")) is not None


def test_a_nan_plan_result_is_returned_but_not_cached(folder: Path, tmp_path: Path) -> None:
    prep = prepare(str(folder))
    task = task_for(prep, "wiki", "calib", 1, 16, None)
    ev = Evaluator(prep, task, progress=False)
    plan = uniform_plan(prep.targets, QuantFormat.parse("4"), prep.loaded.model_id)
    ev(plan)
    files = list((tmp_path / "cache" / "evals").rglob("*.json"))
    assert len(files) == 1
    # the same plan on a model whose quantized output is NaN: not stored
    with torch.no_grad():
        prep.loaded.model.lm_head.weight[0, 0] = float("inf")
    ev2 = Evaluator(prep, task, progress=False)
    ev2._ref = ev.reference()  # the fp reference from the healthy model
    result, _ = ev2(plan)
    assert result.metrics["kl"] != result.metrics["kl"] or result.metrics["kl"] == float("inf")
    assert len(list((tmp_path / "cache" / "evals").rglob("*.json"))) == 1


def test_converted_checkpoint_checksums(tmp_path: Path) -> None:
    folder = tmp_path / "conv"
    folder.mkdir()
    save_file({"w": torch.arange(6.0)}, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    assert converted_problem(folder) is not None and CHECKSUMS in str(converted_problem(folder))
    _record_checksums(folder)
    assert converted_problem(folder) is None
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the weights
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert "does not match" in str(converted_problem(folder))
    (folder / "model.safetensors").write_bytes(b"")
    assert "does not match" in str(converted_problem(folder))
    (folder / "model.safetensors").unlink()
    assert "missing" in str(converted_problem(folder))


def test_conversion_removes_what_a_killed_conversion_left(tmp_path: Path) -> None:
    """A killed conversion's temporaries (dead pid, or the pid-less legacy name) are removed by
    the next one; a live process's temporary, and other folders, are kept."""
    import subprocess

    models = tmp_path / "models"
    models.mkdir()
    target = models / "smollm2-135m-fp32"
    proc = subprocess.Popen(["sleep", "0"])  # noqa: S603, S607
    proc.wait()  # a pid that has exited
    stale = models / f".smollm2-135m-fp32.tmp-{proc.pid}-abcd1234"
    legacy = models / ".smollm2-k3j_x9q2"
    live = models / f".smollm2-135m-fp32.tmp-{os.getpid()}-zzzz9999"
    other = models / ".smollm2-notes"
    for p in (stale, legacy, live, other):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"half")

    def save(folder: Path) -> None:
        save_file({"w": torch.arange(4.0)}, folder / "model.safetensors")

    write_converted(target, save)
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and other.exists()
    assert converted_problem(target) is None  # checksums recorded, folder complete
    assert sorted(p.name for p in models.iterdir()) == sorted([target.name, live.name, other.name])


def test_data_fingerprint_is_the_windows_not_their_batching() -> None:
    ids = torch.arange(4 * 6).reshape(4, 6)
    lab = torch.tensor([0, 1, 2, 3])
    one = [{"input_ids": ids[i : i + 1]} for i in range(4)]
    two = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    assert data_fingerprint(one) == data_fingerprint(two) == data_fingerprint([{"input_ids": ids}])
    assert data_fingerprint([ids[:2], ids[2:]], [lab[:2], lab[2:]]) == data_fingerprint(
        [ids[i : i + 1] for i in range(4)], [lab[i : i + 1] for i in range(4)]
    )
    # other windows, another order, other labels: another key
    swapped = [{"input_ids": ids[2:]}, {"input_ids": ids[:2]}]
    other = [{"input_ids": ids[:2] + 1}, {"input_ids": ids[2:]}]
    assert data_fingerprint(two) != data_fingerprint(swapped)
    assert data_fingerprint(two) != data_fingerprint(other)
    assert data_fingerprint([ids], [lab]) != data_fingerprint([ids], [lab.flip(0)])
    assert data_fingerprint([ids], [lab]) != data_fingerprint([ids])


def test_the_fp_models_evaluation_is_read_off_its_reference(folder: Path) -> None:
    """The fp32 row is not run twice: the Evaluator takes it from the reference logits, and it
    equals evaluating the model afresh (the oracle) exactly; the model's forward runs only for
    the reference."""
    from mpq.evaluate import evaluate

    prep = prepare(str(folder))
    task = task_for(prep, "wiki", "calib", 2, 16, None)
    ev = Evaluator(prep, task, progress=False)
    ref = ev.reference()
    calls: list[int] = []
    hook = prep.loaded.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        got, _ = ev(None)
    finally:
        hook.remove()
    assert calls == []  # no forward pass beyond the reference's
    oracle = evaluate(task, prep.loaded.model, ref)
    assert got.metrics == oracle.metrics and got.units == oracle.units
    assert got.metrics["kl"] == 0.0 and got.metrics["agree"] == 1.0 and "nll" in got.metrics
