"""RAMP's SAC agent: environment shapes, the budget clamp, determinism, the gap to the optimum.

Tiny training runs only (a few hundred steps: 6 decisions per episode). Gaps measured before
stating them (objective / brute-force optimum, suite problems of 6 decisions x 4 options, 15%
disallowed, one budgeted resource, seeds 0..N): see ``STATED_GAP`` and the module docstring of
`mpq.solvers.sac`; the conformance run uses one policy trained once and *transferred* to every
problem, with no optimality claim (transfer across unrelated problems is not what it is for:
that 300-step policy is at most 88.9x / 154.5x the optimum on seeds 0..199, one / three
resources, median 1.82x / 2.79x).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
pytest.importorskip("gymnasium")

from mpq.errors import MpqError  # noqa: E402
from mpq.solvers.base import AllocationProblem, Solution  # noqa: E402
from mpq.solvers.ilp import solve_ilp  # noqa: E402
from mpq.solvers.sac import (  # noqa: E402
    FEATURES,
    PRETRAINED,
    AllocationEpisode,
    NumpyActor,
    level_plan,
    load_policy,
    policy_plan,
    save_policy,
    solve_sac,
    train_sac,
)
from mpq.testing import SolverConformance, SolverSpec, brute_force, random_problem  # noqa: E402

STEPS = 300
# Measured with the defaults (learning rate 3e-4), 300 steps (50 episodes), training seed 0,
# on suite seeds 0..29 (one resource): the answer (the better of the policy's plan and the best
# plan met in training) at most 3.06x the optimum (90th percentile 1.87x, median 1.18x,
# optimal on 27%); the deterministic policy's own plan alone at most 10.2x (median 1.53x,
# optimal on 10%). Seeds 0, 1, 2 give 1.00x, 1.15x, 1.00x. Stated: 3.1x (the measured worst
# case, rounded up). A learning rate of 3e-3 does better here (at most 1.85x) and far worse
# on 100 decisions, hence the default.
STATED_GAP = 3.1
# The shipped policy zero-shot on the suite's problems, seeds 0..199, 15% of options
# disallowed: at most 2.00x / 2.42x the optimum (one / three budgeted resources; 99th
# percentile 1.66x / 2.12x, median 1.00x, optimal on 70% / 62%). 6 decisions are where the
# LP's water level rounds worst; on 100+ decisions it is within 1% (BENCHMARKS.md).
SHIPPED_RATIO = 2.5


def solve_shipped(problem: AllocationProblem) -> Solution:
    return solve_sac(problem)  # the shipped policy, zero-shot


class TestSacShippedConformance(SolverConformance):
    # Budget, infeasible, determinism, disallowed options, and the stated ratio of the shipped
    # policy used zero-shot (never trained on these problems).
    spec = SolverSpec("sac-shipped", solve_shipped, max_ratio=SHIPPED_RATIO)


def test_env_reset_and_step_shapes() -> None:
    from gymnasium.utils.env_checker import check_env

    from mpq.solvers._sac_env import AllocationEnv

    p = random_problem(0, disallow=0.15)
    env = AllocationEnv(AllocationEpisode(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs.shape == (len(FEATURES),) == env.observation_space.shape == (18,)
    assert obs.dtype == np.float32 and env.action_space.shape == (1,)
    assert env.action_space.low[0] == -1.0 and env.action_space.high[0] == 1.0
    assert obs[0] == 0.0 and obs[10] == 0.0 and 0.0 <= obs[9] <= 1.0 and obs[12] == 0.0
    steps = 0
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(np.array([0.5], dtype=np.float32))
        steps += 1
        assert obs.shape == (18,) and isinstance(reward, float)
        assert not truncated
    assert steps == len(p.decisions)
    assert p.feasible(info["choice"]) and np.all(obs == 0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0.5], dtype=np.float32))


def test_actions_scale_the_water_level_and_the_clamp_keeps_the_budget() -> None:
    rng = np.random.default_rng(0)
    for seed in range(20):
        for resources in (1, 3):
            p = random_problem(seed, resources=resources, disallow=0.15)
            ep = AllocationEpisode(p)
            level = ep.run(lambda obs: 0.0)
            assert np.array_equal(level, level_plan(p))
            spend = ep.run(lambda obs: 1.0)  # a quarter of the price at every step
            rand = ep.run(lambda obs: float(rng.uniform(-1, 1)))
            ep.reset()  # a lower price never buys a cheaper option of the decision at hand
            ranks = [ep.rank[0, ep.target(a)] for a in (-1.0, -0.3, 0.0, 0.3, 1.0)]
            assert ranks == sorted(ranks), (seed, ranks)
            if resources == 1:  # the clamp alone guarantees the budget with one resource
                assert p.feasible(level) and p.feasible(spend) and p.feasible(rand), seed
    p = random_problem(0, frac=1.0)
    top = AllocationEpisode(p).run(lambda obs: 1.0)  # the budget fits every dearest option
    assert p.distortion_of(top) == pytest.approx(brute_force(p)[0], rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_shaped_return_is_the_plan_against_the_lp_bound(seed: int) -> None:
    """The shaping telescopes: an episode's rewards sum to reward_scale x (LP bound - plan) /
    LP bound, where the LP bound is scipy's LP relaxation of the problem."""
    from scipy.optimize import linprog

    p = random_problem(seed, decisions=8, options=4, frac=0.4)
    dec, opt = np.nonzero(p.allowed)
    a_eq = np.zeros((8, len(dec)))
    a_eq[dec, np.arange(len(dec))] = 1
    lp = linprog(
        p.distortion[dec, opt],
        A_ub=p.costs["bits"][dec, opt][None],
        b_ub=[p.limits["bits"]],
        A_eq=a_eq,
        b_eq=np.ones(8),
        bounds=(0, 1),
        method="highs",
    ).fun
    ep = AllocationEpisode(p, reward_scale=7.0)
    rng = np.random.default_rng(seed)
    total, finished = 0.0, False
    while not finished:
        r, finished = ep.step(float(rng.uniform(-1, 1)))
        total += r
    plan = p.distortion_of(ep.choice)
    assert plan >= lp * (1 - 1e-9)
    assert total == pytest.approx(7.0 * (lp - plan) / lp, rel=1e-7, abs=1e-12)


def test_numpy_actor_is_the_sb3_policy_and_round_trips(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    p = random_problem(4, disallow=0.15)
    model = train_sac(p, total_timesteps=120, seed=0, learning_starts=20)
    assert not list(scratch.glob("SB3-*"))  # no logger folder left behind
    path = tmp_path / "policy.safetensors"
    save_policy(model, path, {"name": "test"})
    actor = load_policy(path)
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs = rng.uniform(-2, 2, len(FEATURES)).astype(np.float32)
        want, _ = model.predict(obs, deterministic=True)
        assert actor(obs) == pytest.approx(float(want[0]), abs=1e-5)
    assert np.array_equal(policy_plan(actor, p)[0], policy_plan(model, p)[0])
    assert actor.meta["name"] == "test" and actor.meta["version"] == "2"


def test_policy_files_are_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.numpy import load_file, save_file

    shipped = load_policy()
    assert isinstance(shipped, NumpyActor) and PRETRAINED.stat().st_size < 200_000
    weights = load_file(str(PRETRAINED))
    bad = tmp_path / "old.safetensors"
    save_file(weights, str(bad), metadata={**shipped.meta, "version": "0"})
    with pytest.raises(MpqError, match="v0"):
        load_policy(bad)
    save_file(weights, str(bad), metadata={**shipped.meta, "features": "depth,kind"})
    with pytest.raises(MpqError, match="features"):
        load_policy(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(MpqError, match="safetensors"):
        load_policy(tmp_path / "junk.safetensors")
    with pytest.raises(MpqError, match="no SAC policy"):
        load_policy(tmp_path / "missing.safetensors")


def test_solve_sac_is_deterministic_and_within_budget() -> None:
    p = random_problem(1, disallow=0.15)
    a = solve_sac(p, total_timesteps=200, seed=3)
    b = solve_sac(p, total_timesteps=200, seed=3)
    assert np.array_equal(a.choice, b.choice) and a.objective == b.objective
    assert a.stats["policy_measured"] == b.stats["policy_measured"]
    assert p.feasible(a.choice) and a.status == "feasible" and a.solver == "sac"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trained_agent_is_within_the_stated_gap_of_the_optimum(seed: int) -> None:
    p = random_problem(seed, disallow=0.15)
    best, _ = brute_force(p)
    sol = solve_sac(p, total_timesteps=STEPS, seed=0)
    assert p.feasible(sol.choice)
    assert sol.objective >= best * (1 - 1e-9)
    assert sol.objective <= STATED_GAP * best, (sol.objective / best, sol.stats)


def test_policy_transfers_to_other_budgets() -> None:
    p = random_problem(5, decisions=8, frac=0.5)
    model = train_sac(p, total_timesteps=STEPS, seed=0)
    lo = p.min_costs()["bits"]
    hi = float(p.costs["bits"].max(axis=1).sum())
    for frac in (0.0, 0.2, 0.8, 1.0):
        q = AllocationProblem(
            p.decisions, p.options, p.distortion, p.costs, {"bits": lo + frac * (hi - lo)}
        )
        sol = solve_sac(q, model=model, level=False)  # no training: the policy's own plan
        assert q.feasible(sol.choice) and sol.stats["timesteps"] == 0
        assert sol.stats["source"] == "policy"
        choice, clamped = policy_plan(model, q)
        assert np.array_equal(choice, sol.choice) and clamped == sol.stats["clamped"]


def test_sac_on_a_measure_and_bad_input() -> None:
    p = random_problem(2, disallow=0.15)
    rng = np.random.default_rng(0)
    true = p.distortion * np.exp(rng.normal(0.0, 1.0, p.distortion.shape))
    idx = np.arange(len(p.decisions))
    sol = solve_sac(p, lambda c: float(true[idx, c].sum()), total_timesteps=150, seed=0)
    assert p.feasible(sol.choice) and sol.stats["measured"] == float(true[idx, sol.choice].sum())
    with pytest.raises(MpqError, match="features"):
        AllocationEpisode(p, features=np.zeros((2, 6)))
    with pytest.raises(MpqError, match="budget"):
        solve_sac(AllocationProblem(p.decisions, p.options, p.distortion, p.costs, {}))
    with pytest.raises(MpqError, match="infeasible"):
        train_sac(p, total_timesteps=10, budgets=[{"bits": 0.0}])
    tight = AllocationProblem(
        p.decisions, p.options, p.distortion, p.costs, {"bits": p.min_costs()["bits"] - 1}
    )
    inf = solve_sac(tight, total_timesteps=10)
    assert inf.status == "infeasible" and inf.min_feasible == tight.min_costs()
    assert solve_ilp(tight).status == "infeasible"


def test_action_intervals_give_the_option_they_label() -> None:
    """Oracle: every action of the grid. An action inside the interval of a reachable option
    gives it; the interval is the whole set of grid actions that give it."""
    from mpq.solvers._sac_imitate import GRID, action_interval, aim, label_action

    rng = np.random.default_rng(0)
    checked = 0
    for seed in range(12):
        p = random_problem(seed, resources=1 + 2 * (seed % 2), disallow=0.15)
        ep = AllocationEpisode(p)
        while ep.t < ep.n:
            d = ep.t
            got = np.array([ep.target(float(a)) for a in GRID])
            for o in np.flatnonzero(p.allowed[d]):
                lo, hi = action_interval(ep, int(o))
                assert -1.0 <= lo <= hi <= 1.0
                if (got == o).any():
                    assert (lo, hi) == (GRID[got == o][0], GRID[got == o][-1])
                    a, b = aim(lo, hi)
                    for x in (a, b, label_action(lo, hi)):
                        assert ep.target(x) == o, (seed, d, o, x)
                    checked += 1
            ep.step(float(rng.uniform(-1, 1)))
    assert checked > 50


def test_fit_actor_puts_actions_inside_their_intervals() -> None:
    from mpq.solvers._sac_imitate import Labelled, fit_actor

    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (400, len(FEATURES))).astype(np.float32)
    up = obs[:, 11] > 0  # a rule of one feature: raise the price or lower it
    lo = np.where(up, 0.3, -0.6)
    hi = np.where(up, 0.5, -0.4)
    w = fit_actor(Labelled(obs, lo, hi), epochs=200, lr=3e-3, seed=0)
    actor = NumpyActor(w, {})
    acts = np.array([actor(o) for o in obs])
    assert np.mean((acts >= lo - 0.05) & (acts <= hi + 0.05)) > 0.95  # measured: 1.0
    again = fit_actor(Labelled(obs, lo, hi), epochs=200, lr=3e-3, seed=0)
    assert all(np.array_equal(w[k], again[k]) for k in w)  # deterministic for a seed
    zero = NumpyActor(
        fit_actor(Labelled(obs, -np.ones(400), np.ones(400)), net_arch=(16,), epochs=2, seed=0), {}
    )
    assert all(zero(o) == 0.0 for o in obs[:20])  # no label off 0: the water level stays


def test_version_1_policy_still_loads_and_is_the_water_level() -> None:
    v1 = load_policy(PRETRAINED.with_name("sac_policy_v1.safetensors"))
    assert v1.meta["version"] == "1" and v1.inputs == 13
    for seed in range(5):
        p = random_problem(seed, decisions=20, disallow=0.15)
        choice, _ = policy_plan(v1, p)
        assert p.feasible(choice) and np.array_equal(choice, level_plan(p))


# The shipped policy against its start (the water level, action 0) on held-out synthetic
# tables it was never trained on (the suite's generator, 40 decisions x 5 options, seeds
# 0..7, budgets at 30% and 70%; its training tables came from other generators). Measured:
# the actor's plan / the level's plan is 0.9986 on average (better on 4, worse on 2 of 16),
# worst 1.0098. Stated: mean <= 1 and each <= 1.02 (the plans are integer choices computed
# in float64 numpy: a difference across machines would be a different plan, not a rounding).
HELD_OUT_WORST = 1.02


def test_shipped_policy_is_no_worse_than_its_start_on_held_out_tables() -> None:
    actor = load_policy()
    assert actor.meta["version"] == "2" and actor.inputs == len(FEATURES)
    ratios = []
    for seed in range(8):
        for frac in (0.3, 0.7):
            p = random_problem(seed, decisions=40, options=5, frac=frac)
            choice, _ = policy_plan(actor, p)
            assert p.feasible(choice)
            level = p.distortion_of(level_plan(p))
            ratios.append(p.distortion_of(choice) / level)
            answer = solve_sac(p)  # the better of the two: never worse than the start
            assert p.feasible(answer.choice) and answer.objective <= level
            assert answer.stats["source"] in ("policy", "water level", "rounded level")
    assert np.mean(ratios) <= 1.0 and max(ratios) <= HELD_OUT_WORST, ratios


def _classifier_problem(frac: float) -> AllocationProblem:
    """Five small layers and a last one six times their size (a classifier, as in
    MobileNetV2), 3..6 bits, the bit budget ``frac`` of the way from the least plan to the
    largest."""
    bits = np.array([3.0, 4.0, 5.0, 6.0])
    size = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 6.0])
    sens = np.array([1.0, 2.0, 0.5, 1.5, 1.0, 1.0])
    dist = sens[:, None] * size[:, None] * 4.0 ** -bits[None, :]
    cost = size[:, None] * bits[None, :]
    lo, hi = cost.min(1).sum(), cost.max(1).sum()
    return AllocationProblem(
        tuple(f"d{i}" for i in range(6)),
        tuple(f"{b:g}" for b in bits),
        dist,
        {"bits": cost},
        {"bits": lo + frac * (hi - lo)},
    )


def test_rounding_the_lump_finds_the_optimum_when_one_huge_decision_matters() -> None:
    """Oracle: brute force over the 4^6 plans. The LP buys part of the classifier's step and
    the plain water level rounds it down at the end, after the small layers spent its budget
    (MobileNetV2 at 5 bits in BENCHMARKS.md: 10.8% off the ILP); fixing the lump at its better
    side first gives the optimum. Measured on the 19 budgets 5%..95%: the plain level 1.14x and
    1.25x the optimum at 55% and 90%, the rounded level optimal there and at most 1.053x
    elsewhere (at 20%, where the plain level is optimal)."""
    for frac in np.linspace(0.05, 0.95, 19):
        p = _classifier_problem(float(frac))
        best, _ = brute_force(p)
        plain = p.distortion_of(level_plan(p))
        rounded = p.distortion_of(level_plan(p, rounding=True))
        if min(abs(frac - 0.55), abs(frac - 0.9)) < 1e-9:
            assert plain > 1.1 * best and rounded == pytest.approx(best, rel=1e-12)
        answer = solve_sac(p)  # the better of the actor's plan and both levels
        assert p.feasible(answer.choice)
        assert answer.objective == pytest.approx(best, rel=1e-12), frac
        assert answer.objective <= min(plain, rounded) * (1 + 1e-12)


def test_rounding_needs_one_budget_and_a_lump() -> None:
    """With several budgets the rounded episode is the plain one (a one-resource argument);
    on a table of equal layers no step is a lump, so rounding changes nothing."""
    for seed in (1, 3, 5):
        p = random_problem(seed, resources=3, disallow=0.15)
        assert np.array_equal(level_plan(p, rounding=True), level_plan(p))
    bits = np.array([2.0, 3.0, 4.0, 5.0])
    rng = np.random.default_rng(0)
    dist = rng.uniform(0.5, 2.0, (30, 1)) * 4.0 ** -bits[None, :]
    cost = np.tile(bits, (30, 1))
    for frac in (0.2, 0.5, 0.8):
        budget = cost.min(1).sum() + frac * (cost.max(1).sum() - cost.min(1).sum())
        p = AllocationProblem(
            tuple(f"d{i}" for i in range(30)),
            ("2", "3", "4", "5"),
            dist,
            {"bits": cost},
            {"bits": float(budget)},
        )
        assert np.array_equal(level_plan(p, rounding=True), level_plan(p))
