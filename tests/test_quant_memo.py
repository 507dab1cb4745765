"""apply_plan's memo: plans applied one after another reuse each (target, format)'s quantized
weight, and the result is bit-identical to quantizing afresh (the oracle: no memo)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import mpq.executor as ex
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.pipeline import Evaluator, prepare, task_for
from mpq.plan import BitPlan, uniform_plan

torch.set_num_threads(1)
A, B = QuantFormat.parse("3:g32:mse"), QuantFormat.parse("4:g32:asym")


@pytest.fixture
def folder(tiny_folder: Path, mpq_env: Path) -> Path:
    """The session's tiny LLaMA (read only), with a private $MPQ_CACHE."""
    return tiny_folder


def _mixed(prep, first: QuantFormat, rest: QuantFormat) -> BitPlan:  # type: ignore[no-untyped-def]
    names = [t.name for t in prep.targets]
    return BitPlan({n: first if i == 0 else rest for i, n in enumerate(names)}, "tiny")


def _weights(model: torch.nn.Module, prep) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [model.get_submodule(t.name).weight.detach().clone() for t in prep.targets]


def test_memo_reuses_quantized_weights_and_changes_nothing(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prep = prepare(str(folder))
    model, targets = prep.loaded.model, prep.targets
    calls: list[str] = []
    real = ex._quantize_one

    def counting(w, fmt, st, cfg):  # type: ignore[no-untyped-def]
        calls.append(fmt.spec())
        return real(w, fmt, st, cfg)

    monkeypatch.setattr(ex, "_quantize_one", counting)
    memo: dict = {}
    plans = [_mixed(prep, A, B), _mixed(prep, B, A), uniform_plan(targets, A, "tiny")]
    with_memo = [_weights(ex.apply_plan(model, p, targets, mode="fake", memo=memo), prep)
                 for p in plans]  # fmt: skip
    n = len(targets)
    # plan 1 quantizes every target once; plan 2 only its first target at B... and the rest at
    # A, except what plan 1 already did at A (the first target); plan 3 nothing new
    assert len(calls) == n + (n - 1) + 0 + 1
    assert set(memo) == {(t.name, f.spec()) for t in targets for f in (A, B)}
    calls.clear()
    fresh = [_weights(ex.apply_plan(model, p, targets, mode="fake"), prep) for p in plans]
    assert len(calls) == 3 * n
    for got, want in zip(with_memo, fresh, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    with pytest.raises(MpqError, match="memo"):
        ex.apply_plan(model, plans[0], targets, mode="packed", memo={})


def test_evaluator_with_a_shared_memo_gives_the_fresh_results(folder: Path, mpq_env: Path) -> None:
    prep = prepare(str(folder))
    task = task_for(prep, "wiki", "calib", 2, 16, None)  # 2 windows: finite standard errors
    memo: dict = {}
    shared = Evaluator(prep, task, progress=False, memo=memo)
    plans = [_mixed(prep, A, B), _mixed(prep, B, A)]
    got = [shared(p)[0].metrics for p in plans]
    assert memo and all(len(v) == 2 * len(prep.targets) for v in memo.values())
    for p, metrics in zip(plans, got, strict=True):
        shutil.rmtree(mpq_env / "evals")  # no cached answers
        want = Evaluator(prep, task, progress=False)(p)[0].metrics
        assert metrics == want
