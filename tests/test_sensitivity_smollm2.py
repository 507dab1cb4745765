"""Measured damage on the real model: zero at 16 bits, growing as bits shrink (slow)."""

from __future__ import annotations

import pytest

from mpq.evaluate import reference
from mpq.formats import KEEP, QuantFormat
from mpq.pipeline import Prepared, prepare, task_for
from mpq.sensitivity.measured import Measured, measure_target
from mpq.sensitivity.runner import run_estimator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    mp = pytest.MonkeyPatch()
    mp.setenv("MPQ_CACHE", str(tmp_path_factory.mktemp("mpq-cache")))
    yield prepare(
        "smollm2-135m", include=[r"layers\.0\.mlp\.down_proj$", r"layers\.29\.self_attn\.v_proj$"]
    )
    mp.undo()


def test_measured_damage_is_zero_at_16_bits_and_grows_as_bits_shrink(prep: Prepared) -> None:
    task = task_for(prep, "wiki", "calib", 1, 64, None)
    model = prep.loaded.model
    formats = [QuantFormat.parse(s) for s in ("2:asym", "4:asym", "8:asym")]
    kl = run_estimator(
        Measured(), model, prep.targets, task, model_id="smollm2-135m", formats=formats
    )
    loss = run_estimator(
        Measured(metric="loss"),
        model,
        prep.targets,
        task,
        model_id="smollm2-135m",
        formats=formats,
    )
    ref = reference(task, model)
    assert len(kl.scores) == 2
    for t in prep.targets:
        row = kl.distortions[t.name]
        assert row["2:asym"] > row["4:asym"] > row["8:asym"] >= 0
        # keeping the weight (fp16 storage) costs nothing measurable
        assert measure_target(model, t, [KEEP], task, ref)["16"] < 1e-6
    # the loss change is noisier (it may even drop on 63 tokens) but 2 bits cost something
    assert sum(loss.distortion(t.name, "2:asym") for t in prep.targets) > 0


def test_cached_block_path_equals_plain_path_on_smollm2(prep: Prepared) -> None:
    """The block cache recognizes SmolLM2 and gives the plain path's KL and Δloss (1e-6)."""
    from mpq.sensitivity.blocks import capture

    task = task_for(prep, "wiki", "calib", 2, 32, 2)
    model = prep.loaded.model
    assert not isinstance(capture(model, task), str)
    formats = [QuantFormat.parse(s) for s in ("3:asym", "8:asym")]
    for metric in ("kl", "loss"):
        plain, fast = (
            run_estimator(
                Measured(metric=metric, path=path),
                model,
                prep.targets,
                task,
                model_id="smollm2-135m",
                formats=formats,
                progress=False,
            )
            for path in ("plain", "auto")
        )
        for t in prep.targets:
            for f in formats:
                want = plain.distortion(t.name, f.spec())
                assert fast.distortion(t.name, f.spec()) == pytest.approx(want, rel=1e-6, abs=1e-12)
