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

import functools
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
    AllocationEpisode,
    policy_plan,
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


@functools.cache
def transfer_model() -> object:
    """One policy trained on one random problem at 9 budgets, reused for every problem."""
    p = random_problem(12345, disallow=0.15)
    lo = p.min_costs()["bits"]
    hi = float(np.where(p.allowed, p.costs["bits"], -np.inf).max(axis=1).sum())
    budgets = [{"bits": lo + f * (hi - lo)} for f in np.linspace(0.1, 0.9, 9)]
    return train_sac(p, total_timesteps=STEPS, seed=0, budgets=budgets)


def solve_transfer(problem: AllocationProblem) -> Solution:
    return solve_sac(problem, model=transfer_model())


class TestSacTransferConformance(SolverConformance):
    # Budget, infeasible, determinism, disallowed options; no optimality claim (max_ratio None).
    spec = SolverSpec("sac-transfer", solve_transfer)
    seeds = range(4)


def test_env_reset_and_step_shapes() -> None:
    from gymnasium.utils.env_checker import check_env

    from mpq.solvers._sac_env import AllocationEnv

    p = random_problem(0, disallow=0.15)
    env = AllocationEnv(AllocationEpisode(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs.shape == (len(FEATURES),) == env.observation_space.shape == (11,)
    assert obs.dtype == np.float32 and env.action_space.shape == (1,)
    assert env.action_space.low[0] == 0.0 and env.action_space.high[0] == 1.0
    assert obs[0] == 0.0 and obs[10] == 0.0 and 0.0 <= obs[9] <= 1.0
    steps = 0
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(np.array([0.5], dtype=np.float32))
        steps += 1
        assert obs.shape == (11,) and isinstance(reward, float) and reward <= 0
        assert not truncated
    assert steps == len(p.decisions)
    assert p.feasible(info["choice"]) and np.all(obs == 0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0.5], dtype=np.float32))


def test_actions_map_to_rungs_and_the_clamp_keeps_the_budget() -> None:
    rng = np.random.default_rng(0)
    for seed in range(20):
        for resources in (1, 3):
            p = random_problem(seed, resources=resources, disallow=0.15)
            ep = AllocationEpisode(p)
            cheap = ep.run(lambda obs: 0.0)
            assert np.array_equal(cheap, ep.cheapest)  # a = 0: every cheapest option
            greedy = ep.run(lambda obs: 1.0)  # always the dearest: the clamp must act
            rand = ep.run(lambda obs: float(rng.uniform()))
            if resources == 1:  # the clamp alone guarantees the budget with one resource
                assert p.feasible(greedy) and p.feasible(rand), (seed, resources)
    p = random_problem(0, frac=1.0)
    ep = AllocationEpisode(p)
    top = ep.run(lambda obs: 1.0)
    assert ep.clamped == 0
    assert all(top[d] == ep.ladder[d][-1] for d in range(len(p.decisions)))


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
        q = AllocationProblem(p.decisions, p.options, p.distortion, p.costs,
                              {"bits": lo + frac * (hi - lo)})
        sol = solve_sac(q, model=model)  # no training: the policy's own plan
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
    tight = AllocationProblem(p.decisions, p.options, p.distortion, p.costs,
                              {"bits": p.min_costs()["bits"] - 1})
    inf = solve_sac(tight, total_timesteps=10)
    assert inf.status == "infeasible" and inf.min_feasible == tight.min_costs()
    assert solve_ilp(tight).status == "infeasible"
