"""Scientific checks: Spearman agreement (over pairs and across layers) and depth profiles."""

from __future__ import annotations

import math

import pytest

from mpq.analysis import depth_profile, layer_spearman, spearman
from mpq.sensitivity.table import SensitivityTable

SPECS = {"2": 16.0, "4": 1.0, "8": 1 / 256}  # distortion scale per format: the format axis


def _table(layer_weight: dict[str, float]) -> SensitivityTable:
    dist = {n: {s: w * scale for s, scale in SPECS.items()} for n, w in layer_weight.items()}
    return SensitivityTable("t", "m", "d", dist)


LAYERS = {f"model.layers.{i}.mlp": float(i + 1) for i in range(6)}


def test_identical_tables_agree_perfectly() -> None:
    a = spearman(_table(LAYERS), _table(LAYERS))
    assert a.rho == pytest.approx(1.0) and a.rho_layers == pytest.approx(1.0)
    assert a.n == len(LAYERS) * len(SPECS)


def test_reversed_layer_ranking_is_caught_across_layers_not_over_pairs() -> None:
    """An estimator that gets every format right and every layer backwards: the pairs look
    fine (the format axis dominates), the across-layer correlation says -1."""
    reversed_ = {n: 7.0 - w for n, w in LAYERS.items()}
    a = spearman(_table(reversed_), _table(LAYERS))
    assert a.rho > 0.5
    assert a.rho_layers == pytest.approx(-1.0)


def test_layer_spearman_matches_scipy_per_format_mean() -> None:
    from scipy.stats import spearmanr

    est = {n: w for n, w in zip(LAYERS, [3.0, 1.0, 2.0, 6.0, 5.0, 4.0], strict=True)}
    t, ref = _table(est), _table(LAYERS)
    want = spearmanr(list(est.values()), list(LAYERS.values())).statistic  # same per format
    assert layer_spearman(t, ref) == pytest.approx(want)
    flat = SensitivityTable("t", "m", "d", {n: {"4": 1.0} for n in LAYERS})
    assert math.isnan(layer_spearman(flat, ref))  # constant scores rank nothing


def test_depth_profile_groups_blocks() -> None:
    prof = depth_profile(_table(LAYERS), "4", edge=1 / 3)
    assert prof == {"early": 1.5, "middle": 3.5, "late": 5.5}
