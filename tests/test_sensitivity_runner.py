"""The estimator runner: every estimator feeds the solvers, runs resume, bad input is refused."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyConvNet, tiny_llama
from torch import nn

from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.problem import build_problem
from mpq.quant.quantize import quant_error
from mpq.sensitivity.base import TargetResult
from mpq.sensitivity.gradient import Fisher
from mpq.sensitivity.hessian import HessianEigen, HessianTrace
from mpq.sensitivity.loss import Calibration, task_loss
from mpq.sensitivity.measured import Measured
from mpq.sensitivity.plot import layer_index, module_type, plot_sensitivity
from mpq.sensitivity.pruning import Pruning
from mpq.sensitivity.runner import (
    ESTIMATORS,
    make_estimator,
    parse_params,
    run_estimator,
)
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.greedy import solve_greedy
from mpq.targets import discover
from mpq.tasks import Task, cnn_head, lm_head

torch.set_num_threads(1)

FORMATS = [QuantFormat(bits=2), QuantFormat(bits=4), QuantFormat(bits=8), QuantFormat(bits=16)]
FAST = {"hessian_trace": {"max_samples": 20}, "hessian_eig": {"max_iter": 20}}


def lm_task(n: int = 4, width: int = 16) -> Task:
    ids = torch.randint(0, 96, (n, width), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(2))
    return Task("causal_lm", "synthetic", "calib", batches, [b[:, 1:] for b in batches], lm_head)


def cnn_task() -> Task:
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return Task("cnn", "synthetic", "calib", list(images.split(4)), None, cnn_head)


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()


# ---------------------------------------------------------------- every estimator, every solver


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_feeds_the_problem_builder(name: str, tmp_path: Path) -> None:
    model = convnet()
    model.fc.weight.requires_grad_(False)  # flags must come back as they were
    model.train()  # and the mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = discover(model)
    est = make_estimator(name, FAST.get(name, {}))
    table = run_estimator(
        est, model, targets, cnn_task(), model_id="conv", formats=FORMATS, progress=False
    )
    assert model.training and not model.fc.weight.requires_grad and model.conv1.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(table.scores) == {t.name for t in targets}
    for t in targets:
        row = table.distortions[t.name]
        assert set(row) == {"2", "4", "8"}  # keep formats need no distortion
        assert all(v >= 0 and math.isfinite(v) for v in row.values())
    # the distortion model of score-only estimators
    w = {t.name: model.get_submodule(t.name).weight for t in targets}
    extras = table.params["extras"]
    for t in targets:
        q4 = quant_error(w[t.name], FORMATS[1])
        score = table.scores[t.name]
        expected = None
        if name == "hessian_trace":
            expected = 0.5 * max(score, 0) / t.numel * q4
        elif name == "hessian_eig":
            expected = 0.5 * abs(score) * q4
        elif name == "fisher":
            expected = 0.5 * extras[t.name]["fisher"] / t.numel * q4
        elif name == "activation":
            expected = max(score, 0) * q4
        if expected is not None:
            assert table.distortion(t.name, "4") == pytest.approx(expected, rel=1e-9, abs=1e-30)
    if name == "hessian_trace":
        assert set(table.stderr) == set(table.scores)
    # any table feeds the problem builder and a solver
    model.eval()
    cost = build_cost_model(model, targets, "conv")
    problem = build_problem(cost, FORMATS[:3], {"bits": 5.5}, table)
    assert solve_greedy(problem).status in ("optimal", "feasible")
    # JSON round trip
    again = SensitivityTable.load(table.save(tmp_path / "t.json"))
    assert again.to_dict() == table.to_dict()


# ---------------------------------------------------------------- cache and resume


def _kill_after(n: int, done: list[str]):  # type: ignore[no-untyped-def]
    def cb(name: str) -> None:
        done.append(name)
        if len(done) == n:
            raise KeyboardInterrupt

    return cb


def test_per_target_resume_after_kill_in_callback_and_inside_compute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama()
    targets = discover(model)
    task = lm_task()

    def run(on_target=None):  # type: ignore[no-untyped-def]
        return run_estimator(
            Pruning(),
            model,
            targets,
            task,
            model_id="tiny",
            cache_root=tmp_path,
            progress=False,
            on_target=on_target,
        )

    done: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run(_kill_after(3, done))
    # now kill in the middle of computing the 6th target
    started: list[str] = []
    original = Pruning.compute

    def crashing(self, ctx, group):  # type: ignore[no-untyped-def]
        started.extend(t.name for t in group)
        if len(started) == 3:
            raise KeyboardInterrupt
        return original(self, ctx, group)

    monkeypatch.setattr(Pruning, "compute", crashing)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(Pruning, "compute", original)
    resumed: list[str] = []
    table = run(resumed.append)
    assert not set(resumed) & set(done)
    assert set(resumed) & set(started) == {started[-1]}  # only the interrupted target again
    assert len(resumed) == len(targets) - 5
    fresh = run_estimator(Pruning(), model, targets, task, model_id="tiny", progress=False)
    assert table.to_dict() == fresh.to_dict()


def test_group_estimators_cache_per_target(tmp_path: Path) -> None:
    model = tiny_llama()
    targets = discover(model, exclude=["embed"])
    task = lm_task()

    def run(est, seen):  # type: ignore[no-untyped-def]
        return run_estimator(
            est,
            model,
            targets,
            task,
            model_id="tiny",
            cache_root=tmp_path,
            progress=False,
            on_target=seen.append,
        )

    first: list[str] = []
    a = run(HessianTrace(max_samples=10), first)
    assert len(first) == len(targets)
    again: list[str] = []
    b = run(HessianTrace(max_samples=10), again)
    assert again == [] and a.to_dict() == b.to_dict()
    entries = sorted(p for p in tmp_path.glob("*/*.json") if p.name != "key.json")
    victim = targets[4].name
    next(p for p in entries if p.name == f"{victim}.json").unlink()
    partial: list[str] = []
    run(HessianTrace(max_samples=10), partial)
    assert partial == [victim]
    # Fisher's GWQ threshold is model-wide: one missing target recomputes all of them
    run(Fisher(), [])
    fisher_dir = next(d for d in tmp_path.iterdir() if (d / "key.json").read_text().count("fisher"))
    (fisher_dir / f"{victim}.json").unlink()
    all_again: list[str] = []
    run(Fisher(), all_again)
    assert len(all_again) == len(targets)
    # switching what a table reports reuses the cache
    switched: list[str] = []
    run(Fisher(quantity="outlier_share"), switched)
    assert switched == []


def test_view_parameters_reuse_the_cache_and_other_weights_do_not(tmp_path: Path) -> None:
    model = tiny_llama()
    targets = discover(model)
    task = lm_task()

    def run(est, m, seen):  # type: ignore[no-untyped-def]
        return run_estimator(
            est,
            m,
            targets,
            task,
            model_id="tiny",
            formats=FORMATS,
            cache_root=tmp_path,
            progress=False,
            on_target=seen.append,
        )

    run(Measured(), model, [])
    loss_seen: list[str] = []
    table = run(Measured(metric="loss"), model, loss_seen)
    assert loss_seen == [] and table.estimator == "measured_loss"
    other: list[str] = []
    run(Measured(), tiny_llama(seed=1), other)  # same id, other weights: not trusted
    assert len(other) == len(targets)


def _tampered_score(text: str) -> str:
    entry = json.loads(text)
    entry["value"]["values"]["score"] = 123.0  # valid JSON, plausible schema, wrong content
    return json.dumps(entry)


def _other_key(text: str) -> str:
    entry = json.loads(text)
    entry["key"] = "0" * 20
    return json.dumps(entry)


def _pruning_table(model: nn.Module, cache_root: Path, seen: list[str]) -> SensitivityTable:
    """Pruning scores of ``model``'s targets on ``lm_task()``, cached under ``cache_root``;
    each newly computed target's name is appended to ``seen``."""
    return run_estimator(
        Pruning(), model, discover(model), lm_task(), model_id="tiny", cache_root=cache_root,
        progress=False, on_target=seen.append,
    )  # fmt: skip


@pytest.mark.parametrize(
    "garbage",
    [
        lambda _: "{not json",
        lambda _: "",
        lambda _: '{"values": {"score": 1.0}}',
        lambda _: '{"values": {"score": "x"}, "stderr": {}, "distortions": {}}',
        _tampered_score,
        _other_key,
    ],
    ids=["torn", "empty", "old-schema", "wrong-type", "edited-value", "other-key"],
)
def test_bad_cache_entry_is_logged_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: Any
) -> None:
    model = tiny_llama()
    targets = discover(model)

    def run(seen: list[str]) -> SensitivityTable:
        return _pruning_table(model, tmp_path, seen)

    good = run([])
    victim = targets[2].name
    (path,) = tmp_path.glob(f"*/{victim}.json")
    path.write_text(garbage(path.read_text()))
    seen: list[str] = []
    with caplog.at_level(logging.WARNING, logger="mpq.cache"):
        again = run(seen)
    assert seen == [victim]
    assert any(victim in r.getMessage() and "ignoring" in r.getMessage() for r in caplog.records)
    assert again.to_dict() == good.to_dict()
    entry = json.loads(path.read_text())
    assert TargetResult.from_json(entry["value"]).values["score"] == good.scores[victim]


def test_one_changed_weight_under_the_same_id_is_not_served_from_the_cache(
    tmp_path: Path,
) -> None:
    model = tiny_llama()
    targets = discover(model)

    def run(seen: list[str]) -> SensitivityTable:
        return _pruning_table(model, tmp_path, seen)

    run([])
    with torch.no_grad():  # one value, same shapes and the same model id
        model.get_submodule(targets[0].name).weight[3, 5] += 0.25
    seen: list[str] = []
    run(seen)
    assert len(seen) == len(targets)


# ---------------------------------------------------------------- bad input


def test_sdpa_is_refused_for_hessian_vector_products() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    targets = discover(model)
    for est in (HessianTrace(), HessianEigen()):
        with pytest.raises(MpqError, match='attn_implementation="eager"'):
            run_estimator(est, model, targets, lm_task(), model_id="m", progress=False)
    # first-order gradients work with SDPA
    run_estimator(Fisher(), model, targets, lm_task(), model_id="m", progress=False)


def test_bad_calibration_data_and_targets_are_refused() -> None:
    model = tiny_llama()
    targets = discover(model)
    empty = Task("causal_lm", "synthetic", "calib", [], [], lm_head)
    with pytest.raises(MpqError, match="empty"):
        run_estimator(Fisher(), model, targets, empty, model_id="m", progress=False)
    short = lm_task(width=1)
    with pytest.raises(MpqError, match="at least 2 tokens"):
        run_estimator(Fisher(), model, targets, short, model_id="m", progress=False)
    with pytest.raises(MpqError, match="no targets"):
        run_estimator(Fisher(), model, [], lm_task(), model_id="m", progress=False)
    # CCA of an embedding lookup is not defined
    with pytest.raises(MpqError, match="does not support embedding"):
        run_estimator(
            make_estimator("correlation"), model, targets, lm_task(), model_id="m", progress=False
        )
    with pytest.raises(MpqError, match="does not support embedding"):
        run_estimator(
            make_estimator("activation"), model, targets, lm_task(), model_id="m", progress=False
        )
    with pytest.raises(MpqError, match="round-to-nearest"):
        run_estimator(
            Fisher(),
            model,
            targets,
            lm_task(),
            model_id="m",
            formats=[QuantFormat.parse("4:gptq")],
            progress=False,
        )
    # too few tokens for canonical correlation
    tiny = lm_task(n=1, width=3)
    with pytest.raises(MpqError, match="too few"):
        run_estimator(
            make_estimator("correlation"),
            model,
            discover(model, include=["down_proj"]),
            tiny,
            model_id="m",
            progress=False,
        )


def test_nan_loss_names_the_batch() -> None:
    model = tiny_llama()
    targets = discover(model)
    task = lm_task(n=6)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    for est in (Fisher(), Pruning(), HessianTrace(min_samples=2, max_samples=4)):
        with pytest.raises(MpqError, match="calibration batch 0 is nan"):
            run_estimator(est, model, targets, task, model_id="m", progress=False)


def test_make_estimator_and_params() -> None:
    import subprocess
    import sys

    from mpq.sensitivity import ESTIMATOR_NAMES

    assert ESTIMATOR_NAMES == tuple(sorted(ESTIMATORS))
    code = "import sys, mpq.sensitivity as s; s.ESTIMATOR_NAMES; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert parse_params(["tol=0.02,max_samples=50", "seed=3"]) == {
        "tol": "0.02",
        "max_samples": "50",
        "seed": "3",
    }
    est = make_estimator("hessian_trace", parse_params(["tol=0.02,max_samples=50"]))
    assert est == HessianTrace(tol=0.02, max_samples=50)
    assert make_estimator("measured", {"metric": "loss"}).label() == "measured_loss"
    with pytest.raises(MpqError, match="unknown"):
        make_estimator("hessian")
    with pytest.raises(MpqError, match="no parameter 'tolerance'"):
        make_estimator("hessian_trace", {"tolerance": "1"})
    with pytest.raises(MpqError, match="not a valid int"):
        make_estimator("hessian_trace", {"max_samples": "many"})
    with pytest.raises(MpqError, match="tol"):
        make_estimator("hessian_trace", {"tol": "0"})
    with pytest.raises(MpqError, match="metric"):
        make_estimator("measured", {"metric": "mse"})
    with pytest.raises(MpqError, match="fraction"):
        make_estimator("pruning", {"p": "1.5"})
    with pytest.raises(MpqError, match="name=value"):
        parse_params(["tol"])


def test_pseudo_labels_are_the_fp_predictions_computed_once() -> None:
    model = convnet()
    task = cnn_task()
    calib = Calibration(task, model)
    with torch.no_grad():
        fp = [cnn_head(model, b).argmax(-1) for b in task.batches]
        assert all(torch.equal(a, b) for a, b in zip(calib.labels(), fp, strict=True))
        expected = torch.nn.functional.cross_entropy(
            cnn_head(model, task.batches[0]).reshape(-1, 5), fp[0].reshape(-1)
        )
        assert float(task_loss(task, model, 0)) == pytest.approx(float(expected))
        model.fc.weight.mul_(-1.0)  # changes the predictions; the labels stay the fp ones
        assert all(torch.equal(a, b) for a, b in zip(calib.labels(), fp, strict=True))
        assert float(calib.loss(0)) > float(expected)


# ---------------------------------------------------------------- plot


def test_plot_writes_a_png(tmp_path: Path) -> None:
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("model.embed_tokens") is None
    assert module_type("model.layers.12.mlp.up_proj") == "mlp.up_proj"
    assert module_type("features.3.conv.1") == "conv.1"
    table = SensitivityTable(
        estimator="hessian_trace",
        model_id="tiny",
        data_id="d",
        scores={
            "model.embed_tokens": 3.0,
            "model.layers.0.self_attn.q_proj": 1.0,
            "model.layers.0.mlp.down_proj": 0.5,
            "model.layers.1.self_attn.q_proj": 2.0,
            "model.layers.1.mlp.down_proj": -0.1,
            "lm_head": 4.0,
        },
        stderr={"model.layers.0.self_attn.q_proj": 0.1},
    )
    out = plot_sensitivity(table, tmp_path / "plots" / "s.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MpqError, match="no scores"):
        plot_sensitivity(SensitivityTable("x", "m", "d"), tmp_path / "e.png")


def test_power_iteration_in_lockstep_equals_one_layer_at_a_time() -> None:
    model = convnet()
    targets = discover(model)
    task = cnn_task()
    one = run_estimator(HessianEigen(tol=1e-4), model, targets, task, model_id="c", progress=False)
    together = run_estimator(
        HessianEigen(tol=1e-4, layers_per_pass=3),
        model,
        targets,
        task,
        model_id="c",
        progress=False,
    )
    for name, value in one.scores.items():
        assert together.scores[name] == pytest.approx(value, rel=1e-5)
        assert one.params["extras"][name]["converged"] == 1.0
