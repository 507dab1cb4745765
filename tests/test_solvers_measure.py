"""Measured quality on a real (tiny) model: `mpq.calib_measure` feeding the searches and the
guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from mpq.calib_measure import CalibrationMeasure, decision_features, plan_for_choice
from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.evaluate import reference
from mpq.formats import QuantFormat
from mpq.problem import build_problem
from mpq.sensitivity.table import SensitivityTable
from mpq.solvers.evolution import solve_evolution
from mpq.solvers.guard import guard_uniform
from mpq.solvers.ilp import solve_ilp
from mpq.solvers.sac import FEATURES, AllocationEpisode
from mpq.targets import discover
from mpq.tasks import Task, lm_head

FORMATS = [QuantFormat.parse(s) for s in ("2", "4", "8")]


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    model = tiny_llama()
    targets = discover(model, exclude=["embed"])
    cost = build_cost_model(model, targets, "tiny")
    rng = np.random.default_rng(0)
    table = SensitivityTable(
        "synthetic",
        "tiny",
        "none",
        distortions={
            t.name: {f.spec(): float(rng.uniform(0.5, 2.0)) * 4.0**-f.bits for f in FORMATS}
            for t in targets
        },
    )
    problem = build_problem(cost, FORMATS, {"bits": 4.5}, table)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 12), generator=gen)
    task = Task("causal_lm", "synthetic", "calib", [ids], [ids[:, 1:]], lm_head)
    return model, targets, problem, task


def test_calibration_measure_caches_and_leaves_the_model_alone(setup) -> None:  # type: ignore[no-untyped-def]
    model, targets, problem, task = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = CalibrationMeasure(model, targets, problem, FORMATS, task, model_id="tiny")
    n = len(problem.decisions)
    low, high = np.zeros(n, dtype=np.int64), np.full(n, 2, dtype=np.int64)
    assert m(high) < m(low)  # 8 bits lose less than 2 bits
    assert m(low) == m(low.copy()) and m.calls == 2 and m.hits == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the copy's weights are restored after each measurement: measuring again agrees
    fresh = CalibrationMeasure(model, targets, problem, FORMATS, task, reference(task, model))
    assert fresh(high) == pytest.approx(m(high), rel=1e-6)


def test_plan_for_choice_keeps_tie_groups_and_checks_formats(setup) -> None:  # type: ignore[no-untyped-def]
    model, targets, problem, task = setup
    choice = np.arange(len(problem.decisions)) % 3
    plan = plan_for_choice(problem, choice, targets, FORMATS, "tiny")
    plan.validate(targets)
    for t in targets:
        d = problem.decisions.index(t.decision)
        assert plan.formats[t.name] == FORMATS[choice[d]]
    with pytest.raises(MpqError, match="options"):
        plan_for_choice(problem, choice, targets, FORMATS[::-1], "tiny")
    with pytest.raises(MpqError, match="decisions"):
        CalibrationMeasure(model, targets[:3], problem, FORMATS, task)


def test_evolution_and_guard_on_measured_kl(setup) -> None:  # type: ignore[no-untyped-def]
    model, targets, problem, task = setup
    m = CalibrationMeasure(model, targets, problem, FORMATS, task, model_id="tiny")
    sol = solve_evolution(problem, m, generations=3, offspring=4, seed=0)
    assert problem.feasible(sol.choice)
    assert sol.stats["measured"] <= sol.stats["start_measured"]
    assert sol.stats["start_measured"] == m(solve_ilp(problem).choice)
    guarded, why = guard_uniform(problem, sol, m)  # shares the cache: nothing re-measured
    assert guarded.stats["guard"] in ("kept", "replaced") and "uniform" in why
    assert problem.feasible(guarded.choice)
    assert m(guarded.choice) <= m(sol.choice)


def test_decision_features_feed_the_sac_observation(setup) -> None:  # type: ignore[no-untyped-def]
    model, targets, problem, _ = setup
    f = decision_features(problem, targets, model)
    assert f.shape == (len(problem.decisions), 6) and np.isfinite(f).all()
    qkv = problem.decisions.index(next(d for d in problem.decisions if d.endswith("qkv")))
    assert f[qkv, 1] == 64 + 32 + 32  # q (64 rows) + k, v (2 kv heads x 16)
    assert f[qkv, 3] == 64 * 64 + 2 * 32 * 64
    obs = AllocationEpisode(problem, features=f).observation()
    assert obs.shape == (len(FEATURES),) == (18,) and obs[7] != 0 and obs[2] > 0
    assert np.isnan(decision_features(problem, targets)[:, 4:]).all()


def test_activation_formats_measure_on_fresh_copies(setup) -> None:  # type: ignore[no-untyped-def]
    """act_bits < 16 adds forward hooks: repeated measurements must not pile them up."""
    model, targets, _, task = setup
    formats = [QuantFormat.parse(s) for s in ("4:a8", "8:a8")]
    cost = build_cost_model(model, targets, "tiny")
    problem = build_problem(cost, formats, {"bits": 6.5})
    m = CalibrationMeasure(model, targets, problem, formats, task, model_id="tiny")
    assert not m.inplace
    choice = np.ones(len(problem.decisions), dtype=np.int64)
    first = m(choice)
    m.cache.clear()
    assert m(choice) == first  # the same hooks once, not twice
    assert not any(mod._forward_pre_hooks for mod in model.modules())
