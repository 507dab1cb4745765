"""Measured damage: equals a direct single-layer measurement; resumes after a kill."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyConvNet, tiny_llama

from mpq.evaluate import evaluate, reference
from mpq.formats import QuantFormat
from mpq.quant.quantize import fake_quantize
from mpq.sensitivity.measured import measured_damage
from mpq.targets import discover
from mpq.tasks import Task, lm_head

FORMATS = [QuantFormat(bits=2), QuantFormat(bits=4, symmetric=False)]


def _task() -> Task:
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(2))
    return Task("causal_lm", "synthetic", "calib", batches, [b[:, 1:] for b in batches], lm_head)


def test_matches_direct_single_layer_measurement(tmp_path) -> None:
    model = tiny_llama()
    targets = discover(model)
    task = _task()
    ref = reference(task, model)
    table = measured_damage(
        model, targets, FORMATS, task, ref, model_id="tiny", cache_root=tmp_path, progress=False
    )
    for name in ("model.layers.0.mlp.down_proj", "model.embed_tokens"):
        for fmt in FORMATS:
            one = copy.deepcopy(model)  # independent path: a fresh copy, one layer quantized
            w = one.get_submodule(name).weight
            w.data = fake_quantize(w.data, fmt)
            direct = evaluate(task, one, ref)["kl"]
            assert table.distortion(name, fmt.spec()) == pytest.approx(max(direct, 0.0), rel=1e-6)
    # 2 bits hurt more than 4 bits on every layer.
    assert all(row["2"] > row["4:asym"] for row in table.distortions.values())
    # The model is restored exactly.
    fresh = tiny_llama()
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_resume_after_kill_recomputes_at_most_one_target(tmp_path) -> None:
    model = tiny_llama()
    targets = discover(model)
    task = _task()
    ref = reference(task, model)
    done: list[str] = []

    def kill_after_five(name: str) -> None:
        done.append(name)
        if len(done) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measured_damage(
            model,
            targets,
            FORMATS,
            task,
            ref,
            model_id="tiny",
            cache_root=tmp_path,
            progress=False,
            on_target=kill_after_five,
        )
    resumed: list[str] = []
    table = measured_damage(
        model,
        targets,
        FORMATS,
        task,
        ref,
        model_id="tiny",
        cache_root=tmp_path,
        progress=False,
        on_target=resumed.append,
    )
    assert len(resumed) == len(targets) - 5
    assert not set(resumed) & set(done)
    assert set(table.distortions) == {t.name for t in targets}
    # A different key (other formats) does not reuse the cache.
    again: list[str] = []
    measured_damage(
        model,
        targets,
        FORMATS[:1],
        task,
        ref,
        model_id="tiny",
        cache_root=tmp_path,
        progress=False,
        on_target=again.append,
    )
    assert len(again) == len(targets)


def _table(model, task, path: str, formats=FORMATS):  # noqa: ANN001, ANN202
    from mpq.sensitivity.measured import Measured
    from mpq.sensitivity.runner import run_estimator

    return {
        metric: run_estimator(
            Measured(metric=metric, path=path),
            model,
            discover(model),
            task,
            model_id="tiny",
            formats=formats,
            progress=False,
        )
        for metric in ("kl", "loss")
    }


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_cached_block_path_equals_plain_path(batch_size: int) -> None:
    """Every (target, format): KL, Δloss and their standard errors agree to 1e-6 relative."""
    model = tiny_llama()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    batches = list(ids.split(batch_size))
    task = Task("causal_lm", "synthetic", "calib", batches, [b[:, 1:] for b in batches], lm_head)
    formats = [*FORMATS, QuantFormat(bits=3, symmetric=False), QuantFormat(bits=8)]
    plain = _table(model, task, "plain", formats)
    fast = _table(model, task, "auto", formats)
    for metric in ("kl", "loss"):
        a, b = plain[metric], fast[metric]
        assert set(a.distortions) == set(b.distortions)
        for name, row in a.distortions.items():
            assert set(row) == set(b.distortions[name])
            for spec, value in row.items():
                assert b.distortions[name][spec] == pytest.approx(value, rel=1e-6, abs=1e-12)
                se = a.distortion_se[name][spec]
                assert b.distortion_se[name][spec] == pytest.approx(se, rel=1e-5, abs=1e-12)
    # The damage is resolved, not zero: 2 bits hurt far more than 8 bits on a block weight.
    row = fast["kl"].distortions["model.layers.1.mlp.down_proj"]
    assert row["2"] > 100 * row["8"] > 0


def test_block_cache_recognizes_llama_and_refuses_other_tasks() -> None:
    from mpq.sensitivity.blocks import capture
    from mpq.tasks import cnn_head

    model = tiny_llama()
    cache = capture(model, _task())
    assert not isinstance(cache, str)
    assert cache.prefix == "model.layers"
    assert cache.block_of(["model.layers.1.self_attn.q_proj"]) == 1
    assert cache.block_of(["model.embed_tokens"]) is None
    assert cache.block_of(["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]) is None
    images = torch.randn(2, 3, 16, 16)
    cnn = Task("cnn", "photos", "x", [images], None, cnn_head)
    reason = capture(TinyConvNet().eval(), cnn)
    assert isinstance(reason, str) and "language-model" in reason


def test_anchored_table_scales_the_anchor_by_output_error(tmp_path) -> None:
    """``anchor=``: the anchor's entry is the measured one; every other format's entry is the
    anchor's times the ratio of ``tr(dW H dW^T)`` (H from the statistics, computed here
    independently); and in the small-error regime it tracks the fully measured table."""
    from mpq.layerstats import collect_input_stats
    from mpq.sensitivity.measured import Measured, output_error
    from mpq.sensitivity.runner import run_estimator

    model = tiny_llama()
    targets = [t for t in discover(model) if t.kind == "linear"]
    task = _task()
    fmts = [QuantFormat.parse(s) for s in ("4:g16:mse", "6:g16:mse", "8")]
    full = run_estimator(Measured(), model, targets, task, model_id="tiny", formats=fmts,
                         progress=False)  # fmt: skip
    anch = run_estimator(Measured(anchor="6:g16:mse"), model, targets, task, model_id="tiny",
                         formats=fmts, progress=False)  # fmt: skip
    stats = collect_input_stats(model, [t.name for t in targets], task.batches,
                                full=[t.name for t in targets])  # fmt: skip
    ratios = []
    for t in targets:
        a, m = anch.distortions[t.name], full.distortions[t.name]
        assert a["6:g16:mse"] == pytest.approx(m["6:g16:mse"], rel=1e-9, abs=1e-15)
        w = model.get_submodule(t.name).weight.detach()
        st = stats[t.name]

        def err(f: QuantFormat, w: torch.Tensor = w, st=st) -> float:
            q = fake_quantize(w, f, importance=st.diag if f.method == "mse" else None)
            return output_error(q - w, st.diag, st.full)

        e0 = err(fmts[1])
        for f in (fmts[0], fmts[2]):
            want = m["6:g16:mse"] * err(f) / e0
            assert a[f.spec()] == pytest.approx(want, rel=1e-6, abs=1e-15)
            if m[f.spec()] > 1e-9:
                ratios.append(a[f.spec()] / m[f.spec()])
    # Against the fully measured entries (measured here: 0.48-1.20, geometric mean 0.92):
    # within a factor of 3 on every layer, unbiased in the geometric mean within 25 %.
    r = torch.tensor(ratios, dtype=torch.float64)
    assert len(ratios) >= 10
    assert bool(((r > 1 / 3) & (r < 3.0)).all()), r
    assert 0.8 < float(r.log().mean().exp()) < 1.25
