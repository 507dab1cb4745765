"""Quantized weights kept on disk (mpq.quantstore): bit-exact round trips of every kind of
quantized weight, the table's quantizations read back by the evaluator with results identical
to quantizing afresh (the oracle: the same evaluation with the disk store off), keys that follow
the weights and the importance, damaged entries recomputed, and the size cap."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_folder

import mpq.executor as executor
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.layerstats import InputStats
from mpq.pipeline import Evaluator, Prepared, damage_table, prepare, task_for
from mpq.plan import uniform_plan
from mpq.planstats import with_record
from mpq.quant.quantize import QuantizedTensor, dequantize, quantize
from mpq.quantstore import ENV_CAP, QuantStore, cap_bytes, read_entry, write_entry

torch.set_num_threads(1)

MIX_ROWS = "3:g32:dq:mse+4:g32:nl:dq:mse@50"
MIX_COLS = "3:g32:dq:mse+4:g32:nl:dq:mse#11"
SPECS = [
    "3",
    "4:asym",
    "2:g32:asym",
    "5:g32",
    "3:g32:dq:mse",
    "4:g32:nl:dq:mse",
    "4:g32:asym:dq:mse",
    "8:g32:dq",
    "4:g32:nf4",
    MIX_ROWS,
    MIX_COLS,
]


def _same(a: QuantizedTensor, b: QuantizedTensor) -> None:
    """Every field equal, bit for bit (dtype included), recursively."""
    assert a.shape == b.shape and a.fmt == b.fmt
    for name in ("codes", "scales", "zeros"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.dq is None) == (b.dq is None)
    if a.dq is not None:
        for name in ("super_scales", "scale_codes", "super_mins", "min_codes"):
            x, y = getattr(a.dq, name), getattr(b.dq, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.parts is None) == (b.parts is None)
    if a.parts is not None:
        assert torch.equal(a.parts.mask, b.parts.mask)
        _same(a.parts.high, b.parts.high)


def _weight(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, min(7, cols - 1)] *= 8.0  # an outlier column: column mixes pick it
    return w


@pytest.mark.parametrize("spec", SPECS)
def test_every_kind_of_quantized_weight_round_trips_bit_exactly(tmp_path: Path, spec: str) -> None:
    w = _weight()
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.1
    fmt = QuantFormat.parse(spec)
    qt = quantize(w, fmt, importance=imp if fmt.method == "mse" else None)
    path = tmp_path / "e.safetensors"
    size = write_entry(path, "k", qt)
    back = read_entry(path, "k")
    assert back is not None
    _same(qt, back)
    assert torch.equal(dequantize(qt), dequantize(back))
    if fmt.bits <= 4 and fmt.hi is None:  # codes two to a byte: about half a byte per weight
        assert size < w.numel() * 0.5 + 4096 + qt.scales.numel() * 4


def test_odd_counts_of_small_codes_round_trip(tmp_path: Path) -> None:
    w = _weight(rows=3, cols=5)
    qt = quantize(w, QuantFormat.parse("3"))
    write_entry(tmp_path / "e.safetensors", "k", qt)
    back = read_entry(tmp_path / "e.safetensors", "k")
    assert back is not None
    _same(qt, back)


def _stats(cols: int, seed: int) -> dict[str, InputStats]:
    g = torch.Generator().manual_seed(seed)
    diag = (torch.rand(cols, generator=g) + 0.1).double()
    return {"layer": InputStats(diag=diag, full=None, rows=8)}


def test_keys_follow_the_weights_and_the_importance_of_mse_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_CAP, raising=False)
    w = _weight()
    st = _stats(w.shape[1], 0)
    mse, rtn = "4:g32:nl:dq:mse", "4:g32"
    store = QuantStore.open(tmp_path, "m", "weightsA", st)
    for spec in (mse, rtn):
        store[("layer", spec)] = quantize(
            w, QuantFormat.parse(spec), importance=st["layer"].diag if "mse" in spec else None
        )
    again = QuantStore.open(tmp_path, "m", "weightsA", _stats(w.shape[1], 0))  # equal values
    assert ("layer", mse) in again and ("layer", rtn) in again
    _same(again[("layer", mse)], store[("layer", mse)])
    other_weights = QuantStore.open(tmp_path, "m", "weightsB", st)
    assert ("layer", mse) not in other_weights and ("layer", rtn) not in other_weights
    other_imp = QuantStore.open(tmp_path, "m", "weightsA", _stats(w.shape[1], 1))
    assert ("layer", mse) not in other_imp  # mse's result depends on the importance
    assert ("layer", rtn) in other_imp  # rtn's does not
    no_imp = QuantStore.open(tmp_path, "m", "weightsA", {})
    assert ("layer", mse) not in no_imp  # mse without statistics is plain squared error
    with pytest.raises(KeyError):
        no_imp[("layer", mse)]


def test_a_damaged_or_foreign_entry_is_logged_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    qt = quantize(_weight(), QuantFormat.parse("4:g32"))
    path = tmp_path / "e.safetensors"
    write_entry(path, "k", qt)
    assert read_entry(path, "other key") is None  # written under another key
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # one bit of the codes
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="mpq.quantstore"):
        assert read_entry(path, "k") is None
    assert "checksum" in caplog.text
    path.write_bytes(b"not a safetensors file")
    assert read_entry(path, "k") is None
    assert read_entry(tmp_path / "absent.safetensors", "k") is None


def test_the_cache_keeps_under_its_cap_dropping_the_least_recently_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = _weight(rows=64)
    one = write_entry(tmp_path / "probe.safetensors", "k", quantize(w, QuantFormat.parse("8")))
    (tmp_path / "probe.safetensors").unlink()
    monkeypatch.setenv(ENV_CAP, str(3.5 * one / (1 << 20)))  # room for three entries
    root = tmp_path / "quant"
    store = QuantStore.open(root, "m", "wts", {}, keep=False)
    past = time.time() - 100
    for i in range(3):
        store[(f"l{i}", "8")] = quantize(w + i, QuantFormat.parse("8"))
        os.utime(store._path((f"l{i}", "8")), (past + i, past + i))
    assert ("l0", "8") in store  # read: now the most recently used
    store[("l3", "8")] = quantize(w + 3, QuantFormat.parse("8"))
    left = {p.name for p in root.rglob("*.safetensors")}
    assert len(left) == 3
    assert ("l1", "8") not in store  # the least recently used went
    assert all((f"l{i}", "8") in store for i in (0, 2, 3))
    assert sum(p.stat().st_size for p in root.rglob("*.safetensors")) <= cap_bytes()


def test_a_cap_of_zero_keeps_weights_in_memory_only_and_a_bad_cap_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_CAP, "0")
    store = QuantStore.open(tmp_path, "m", "wts", {})
    store[("l", "4")] = quantize(_weight(), QuantFormat.parse("4"))
    assert ("l", "4") in store and not list(tmp_path.rglob("*"))
    monkeypatch.setenv(ENV_CAP, "four gigabytes")
    with pytest.raises(MpqError, match=ENV_CAP):
        cap_bytes()
    monkeypatch.setenv(ENV_CAP, "-1")
    with pytest.raises(MpqError, match="megabytes"):
        cap_bytes()


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama")


def _count_quantize(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = executor.quantize

    def counting(w, fmt, **kw):  # type: ignore[no-untyped-def]
        calls.append(fmt.spec())
        return real(w, fmt, **kw)

    monkeypatch.setattr(executor, "quantize", counting)
    return calls


@pytest.fixture
def prep(base_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Prepared:
    """The tiny model, copied (its weights may change), with a private cache under
    ``tmp_path / "cache"`` and the default cap."""
    folder = tmp_path / "model"
    shutil.copytree(base_folder, folder)
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ENV_CAP, raising=False)
    return prepare(str(folder))


def test_the_evaluator_reads_back_what_the_table_quantized_with_identical_results(
    prep: Prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh Evaluator (a new process, in effect) after the table quantizes nothing, and its
    metrics equal those of the same plans quantized afresh with the disk store off."""
    calib = task_for(prep, "wiki", "calib", 1, 32, None)
    held = task_for(prep, "wiki", "heldout", 1, 32, None)
    specs = ["3:g32:dq:mse", "4:g32:nl:dq:mse", "8:g32:dq", MIX_ROWS]
    fmts = [QuantFormat.parse(s) for s in specs]
    damage_table(prep, fmts, calib, progress=False, anchor="4:g32:nl:dq:mse")
    assert list((tmp_path / "cache" / "quant").rglob("*.safetensors"))
    plans = [with_record(uniform_plan(prep.targets, f, prep.loaded.model_id), calib) for f in fmts]

    calls = _count_quantize(monkeypatch)
    read = [Evaluator(prep, held, progress=False)(p)[0].metrics for p in plans]
    assert calls == []  # every (target, format) came from the table's quantizations

    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache-off"))
    monkeypatch.setenv(ENV_CAP, "0")
    fresh = [Evaluator(prep, held, progress=False)(p)[0].metrics for p in plans]
    assert len(calls) >= len(prep.targets) * len(plans)  # the oracle did quantize
    assert json.dumps(read) == json.dumps(fresh)  # exactly (NaN standard errors included)
    assert not (tmp_path / "cache-off" / "quant").exists()


def test_a_changed_weight_is_quantized_afresh(
    prep: Prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = task_for(prep, "wiki", "heldout", 1, 32, None)
    plan = uniform_plan(prep.targets, QuantFormat.parse("4:g32"), prep.loaded.model_id)
    first = Evaluator(prep, held, progress=False)(plan)[0].metrics
    calls = _count_quantize(monkeypatch)
    assert json.dumps(Evaluator(prep, held, progress=False)(plan)[0].metrics) == json.dumps(first)
    assert calls == []  # an evaluation cached on disk: nothing quantized
    with torch.no_grad():
        prep.loaded.model.get_submodule(prep.targets[0].name).weight.mul_(1.5)
    changed = Evaluator(prep, held, progress=False)(plan)[0].metrics
    assert len(calls) == len(prep.targets)  # other weights: every target quantized again
    monkeypatch.setenv(ENV_CAP, "0")
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache-off"))
    oracle = Evaluator(prep, held, progress=False)(plan)[0].metrics
    assert json.dumps(oracle) == json.dumps(changed)
    assert changed["kl"] != first["kl"]


def test_an_unwritable_cache_costs_time_never_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import mpq.quantstore as qs

    monkeypatch.delenv(ENV_CAP, raising=False)

    def full_disk(*_a, **_k):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qs, "write_entry", full_disk)
    store = QuantStore.open(tmp_path, "m", "wts", {})
    qt = quantize(_weight(), QuantFormat.parse("4"))
    with caplog.at_level(logging.WARNING, logger="mpq.quantstore"):
        store[("l", "4")] = qt
        store[("l2", "4")] = qt
    assert caplog.text.count("No space left") == 1  # said once, then memory only
    assert store.folder is None
    _same(store[("l", "4")], qt)
