"""mse / gptq formats in the whole loop: measured damage, plan records, evaluator, CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from mpq.errors import MpqError
from mpq.evaluate import evaluate, reference
from mpq.formats import QuantFormat
from mpq.layerstats import collect_input_stats
from mpq.plan import BitPlan, uniform_plan
from mpq.planstats import META_KEY, digest_part, task_record, uses_stats, with_record
from mpq.quant.quantize import fake_quantize
from mpq.sensitivity.measured import measured_damage
from mpq.sensitivity.runner import make_estimator, run_estimator
from mpq.targets import discover
from mpq.tasks import Task, lm_head

MSE = QuantFormat.parse("3:g16:mse")
GPTQ = QuantFormat.parse("3:g16:gptq")


def _task() -> Task:
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(2))
    return Task("causal_lm", "synthetic", "calib", batches, [b[:, 1:] for b in batches], lm_head)


def test_measured_damage_scores_mse_and_gptq_with_the_task_statistics(tmp_path: Path) -> None:
    model = tiny_llama()
    targets = discover(model)
    task = _task()
    ref = reference(task, model)
    fmts = [MSE, GPTQ, QuantFormat.parse("3:g16")]
    table = measured_damage(
        model, targets, fmts, task, ref, model_id="tiny", cache_root=tmp_path, progress=False
    )
    name = "model.layers.1.mlp.down_proj"
    st = collect_input_stats(model, [name], task.batches, full=[name])[name]
    assert st.full is not None
    for fmt, kwargs in ((MSE, {"importance": st.diag}), (GPTQ, {"hessian": st.full})):
        one = copy.deepcopy(model)  # the oracle: quantized directly with the task's statistics
        w = one.get_submodule(name).weight
        w.data = fake_quantize(w.data, fmt, **kwargs)
        direct = evaluate(task, one, ref)["kl"]
        assert table.distortion(name, fmt.spec()) == pytest.approx(max(direct, 0.0), rel=1e-6)
    # The tied embedding/head gets mse weighted by the head's input and no gptq option.
    emb = "model.embed_tokens"
    assert set(table.distortions[emb]) == {"3:g16:mse", "3:g16"}
    imp = collect_input_stats(model, [emb], task.batches)[emb].diag
    one = copy.deepcopy(model)
    w = one.get_submodule(emb).weight
    w.data = fake_quantize(w.data, MSE, importance=imp)  # the head reads the same tensor
    direct = evaluate(task, one, ref)["kl"]
    assert table.distortion(emb, MSE.spec()) == pytest.approx(max(direct, 0.0), rel=1e-6)
    # The statistics were cached next to the sensitivity cache.
    assert list((tmp_path.parent / "stats").rglob("*.full.safetensors"))


def test_other_estimators_refuse_statistics_formats() -> None:
    model = tiny_llama()
    with pytest.raises(MpqError, match="use the measured estimator"):
        run_estimator(
            make_estimator("fisher"), model, discover(model), _task(), model_id="tiny",
            formats=[MSE], progress=False,
        )  # fmt: skip


def test_plan_record_digest_and_refusals() -> None:
    model = tiny_llama()
    targets = discover(model)
    task = _task()
    plain = uniform_plan(targets, MSE, "tiny")
    rtn = uniform_plan(targets, QuantFormat.parse("3:g16"), "tiny")
    assert uses_stats(plain) and not uses_stats(rtn)
    recorded = with_record(plain, task)
    assert recorded.meta[META_KEY] == task_record(task)
    assert task_record(task) == {
        "data": "synthetic", "split": "calib", "n": 4, "seq_len": 16, "offset": 0,
        "key": task.key,
    }  # fmt: skip
    assert digest_part(recorded) == task.key and digest_part(plain) == ""
    assert with_record(rtn, task) is rtn  # rtn plans record nothing
    from mpq.pipeline import plan_digest

    assert plan_digest(recorded) != plan_digest(plain)
    again = BitPlan.from_json(recorded.to_json())
    assert again.meta[META_KEY] == recorded.meta[META_KEY]


def test_cli_eval_stats_option_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from mpq.cli import main

    for args, msg in (
        (["--stats", "wiki:heldout:4x16"], "calibration data"),
        (["--stats", "wiki:calib:4"], "DATA:SPLIT:NxLEN"),
    ):
        assert main(["eval", "--plan", "uniform:4:g32:mse", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and msg in err[-1]
