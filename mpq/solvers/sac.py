"""Bit allocation by reinforcement learning: RAMP's agent (Gautam and Jha, "RAMP: Reinforcement
Adaptive Mixed-Precision Quantization for Efficient On-Device LLM Inference", 2026), a Soft
Actor-Critic (Haarnoja et al. 2018; stable-baselines3) acting once per decision, in model order,
in a gymnasium environment.

**Observation**: 11 numbers describing the decision about to be placed (``FEATURES``, all
dimensionless so that a policy transfers across budgets and problems):

====  ==============  ==================================================================
 0    ``depth``       decision index / (decisions - 1): the normalized depth, which is
                      also the step fraction (one step per decision, in model order)
 1    ``kind``        module type code: linear 0, conv2d 0.5, embedding 1 (0 if unknown)
 2    ``log_rows``    log2(output rows) / 16 (0 if unknown)
 3    ``log_cols``    log2(input columns x kernel) / 16 (0 if unknown)
 4    ``log_size``    log2(parameter count / mean over decisions) / 8, clipped to [-1, 1];
                      without features, the decision's cost span (dearest - cheapest
                      option on the first budgeted resource) stands in for its size
 5    ``sens_low``    ln(distortion at the cheapest option / its mean over decisions) / 8,
                      clipped to [-2, 2]
 6    ``sens_high``   ln(distortion at the dearest option / the same mean) / 8, clipped
                      to [-4, 2] (a zero distortion, e.g. kept at 16 bits, gives -4)
 7    ``w_std``       weight standard deviation, log10 scaled: (log10(std) + 3) / 3 (0 if
                      unknown)
 8    ``w_kurt``      log1p(max(excess kurtosis of the weights, 0)) / 5 (0 if unknown)
 9    ``budget``      remaining budget fraction: (budget left - least cost of the decisions
                      still to place) / (their dearest - their least cost), clipped to
                      [0, 1], the minimum over budgeted resources; 1 = everything left can
                      take its dearest option, 0 = everything left must take its cheapest
 10   ``prev``        the previous decision's chosen rung / (its rungs - 1) (HAQ's a_{t-1};
                      0 at the first step)
====  ==============  ==================================================================

Per-decision features (kind, rows, cols, parameter count, weight std and kurtosis) come from
``features=`` or ``problem.meta["features"]``: an array ``[decisions, 6]`` with those columns,
NaN where unknown (:func:`mpq.measure.decision_features` builds it from a model's targets).

**Action**: one number in [0, 1]; the decision's allowed options are ordered from the cheapest
to the dearest (weighted cost, see :func:`mpq.solvers._measure.ladders`) and the action picks
rung ``floor(a * rungs)`` (1 = the dearest).

**Budget clamp**: the environment lowers the rung until every budgeted resource still leaves
room for each later decision at its cheapest option (used + this option + the least cost of
the rest <= limit). With one budgeted resource this guarantees that every plan the policy
makes fits the budget. With several, the per-resource least costs may not be reachable
together; a plan that still ends over a budget is repaired by cheapest downgrades, and only if
that fails the ILP says whether any plan fits (``stats["fallback"]``, never seen in the tests).

**Reward** (quality first, with budget cliffs): each step pays ``-distortion[d, o] / scale``
(scale = the summed distortion of the all-cheapest plan), so an episode returns minus the
plan's normalized table distortion. With a ``measure``, the last step also pays back that
table estimate and charges ``measure(plan) / measure(all-cheapest plan)`` instead: the
episode returns minus the normalized *measured* value, while the table still shapes the
credit of each step (``shaped=False``: only the measured value at the end; it learns worse,
see ``experiments/bench/bench_search.py``). A clamped step also pays ``-cliff x (rungs
clamped) / (rungs - 1) / decisions``: asking for more than the budget allows costs reward, so
the agent learns to spread the budget rather than spend it early. Rewards are multiplied by
``reward_scale`` (10 by default for training: SAC's entropy bonus swamps returns of order 1;
10 beat 1 and 30 on the conformance problems, and 1 on the 100-decision benchmark: 23% from
the optimum after 5000 steps, against 36%).

**Training and transfer**: :func:`train_sac` trains on one problem (optionally on several
budgets, one drawn per episode); since every feature is budget- and size-free, the trained
policy can allocate other budgets and other problems (:func:`solve_sac` with ``model=``).
:func:`solve_sac` without a model trains one and answers with the best (on the measure) of
the final deterministic policy's plan (``stats["source"] = "policy"``), the best plan of the
deterministic policy at checkpoints every ``checkpoint_every`` episodes (``"checkpoint"``:
SAC's last policy is not always its best) and the best plan met while exploring at this
budget (``"training"``). stable-baselines3, gymnasium and torch are imported inside the
functions; importing this module stays numpy-only.

**Measured** (objective / optimum; CPU, one torch thread): on the conformance problems (6
decisions x 4 options), 300 steps (about 2 s): at most 3.06x, median 1.18x over 30 seeds; on
100 decisions x 6 options, 20000 steps (about 150 s): 1.18x, where the ILP is exact in 0.3 s
(``experiments/bench/bench_search.py``). A policy trained 3000 steps on 9 budgets of one
problem, then used without training: across 19 budgets of that problem at most 2.22x (median
1.17x); across 200 unrelated problems at most 21.9x (median 1.50x). SAC is here as RAMP's
baseline and for measured objectives, not as a replacement for the exact solvers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.solvers._common import RTOL, done, over_min, repair_downgrades
from mpq.solvers._measure import CachedMeasure, Measure, cached, ladders
from mpq.solvers.base import AllocationProblem, Solution, infeasible
from mpq.solvers.options import Features, Search, SearchOptions
from mpq.solvers.validate import validate_problem

FEATURES = (
    "depth",
    "kind",
    "log_rows",
    "log_cols",
    "log_size",
    "sens_low",
    "sens_high",
    "w_std",
    "w_kurt",
    "budget",
    "prev",
)
FEATURE_COLUMNS = ("kind", "rows", "cols", "numel", "weight_std", "weight_kurtosis")
OBS_BOUND = 16.0  # every observation is clipped to [-OBS_BOUND, OBS_BOUND]
KIND_CODES = {"linear": 0.0, "conv2d": 0.5, "embedding": 1.0}


def _static_features(problem: AllocationProblem, features: np.ndarray | None) -> np.ndarray:
    """Columns 0..8 of the observation (those that do not depend on the episode)."""
    n = len(problem.decisions)
    out = np.zeros((n, len(FEATURES)), dtype=np.float32)
    if n == 0:
        return out
    feats = features if features is not None else problem.meta.get("features")
    f = np.full((n, len(FEATURE_COLUMNS)), np.nan)
    if feats is not None:
        arr = np.asarray(feats, dtype=float)
        if arr.shape != f.shape:
            raise MpqError(
                f"features have shape {arr.shape}, expected (decisions, {len(FEATURE_COLUMNS)}) "
                f"= {f.shape} with columns {list(FEATURE_COLUMNS)} (NaN where unknown)"
            )
        f = arr
    lad = ladders(problem)
    low = np.array([problem.distortion[d, lad[d][0]] for d in range(n)])
    high = np.array([problem.distortion[d, lad[d][-1]] for d in range(n)])
    first = next(iter(problem.limits)) if problem.limits else next(iter(problem.costs), None)
    if first is not None:
        c = np.asarray(problem.costs[first], dtype=float)
        span = np.array([c[d, lad[d][-1]] - c[d, lad[d][0]] for d in range(n)])
    else:
        span = np.ones(n)
    size = np.where(np.isfinite(f[:, 3]) & (f[:, 3] > 0), f[:, 3], np.nan)
    if np.isnan(size).any():
        size = span
    size = np.maximum(size, 1e-12)
    out[:, 0] = np.arange(n) / max(n - 1, 1)
    out[:, 1] = np.nan_to_num(f[:, 0], nan=0.0)
    out[:, 2] = np.where(f[:, 1] > 0, np.log2(np.maximum(f[:, 1], 1.0)) / 16, 0.0)
    out[:, 3] = np.where(f[:, 2] > 0, np.log2(np.maximum(f[:, 2], 1.0)) / 16, 0.0)
    out[:, 4] = np.clip(np.log2(size / size.mean()) / 8, -1.0, 1.0)
    mean_low = max(float(low.mean()), 1e-300)
    with np.errstate(divide="ignore"):
        out[:, 5] = np.clip(np.log(low / mean_low) / 8, -2.0, 2.0)
        out[:, 6] = np.clip(np.log(high / mean_low) / 8, -4.0, 2.0)
    std = f[:, 4]
    out[:, 7] = np.where(std > 0, (np.log10(np.maximum(std, 1e-30)) + 3) / 3, 0.0)
    kurt = f[:, 5]
    out[:, 8] = np.where(np.isfinite(kurt), np.log1p(np.maximum(kurt, 0.0)) / 5, 0.0)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


class AllocationEpisode:
    """The environment's logic, numpy only: one decision per step, clamped to the budget.

    ``reset(limits)`` starts an episode (the problem's limits by default); ``step(action)``
    places the current decision and returns ``(reward, done)``; ``observation()`` is the
    11-feature vector of the decision about to be placed (zeros once done)."""

    def __init__(
        self,
        problem: AllocationProblem,
        *,
        features: np.ndarray | None = None,
        measure: CachedMeasure | None = None,
        cliff: float = 1.0,
        reward_scale: float = 1.0,
        shaped: bool = True,
    ) -> None:
        if not problem.limits:
            raise MpqError("sac needs a budget on at least one resource")
        self.problem = problem
        self.n = len(problem.decisions)
        self.ladder = ladders(problem)
        self.static_input = features
        self.static = _static_features(problem, features)
        self.measure = measure
        self.cliff = float(cliff)
        self.reward_scale = float(reward_scale)
        self.shaped = bool(shaped) or measure is None
        self.costs = {r: np.asarray(problem.costs[r], dtype=float) for r in problem.limits}
        allowed = problem.allowed
        self.min_cost = {r: np.where(allowed, c, np.inf).min(axis=1) for r, c in self.costs.items()}
        self.max_cost = {
            r: np.where(allowed, c, -np.inf).max(axis=1) for r, c in self.costs.items()
        }
        # Least / dearest cost of decisions d.. (suffix sums; index n is 0).
        self.rest_min = {
            r: np.append(np.cumsum(v[::-1])[::-1], 0.0) for r, v in self.min_cost.items()
        }
        self.rest_max = {
            r: np.append(np.cumsum(v[::-1])[::-1], 0.0) for r, v in self.max_cost.items()
        }
        idx = np.arange(self.n)
        cheapest = np.array([lad[0] for lad in self.ladder], dtype=np.int64)
        self.scale = max(float(problem.distortion[idx, cheapest].sum()), 1e-300)
        self.cheapest = cheapest
        self._measure_scale: float | None = None
        self.reset()

    def reset(self, limits: Mapping[str, float] | None = None) -> None:
        lim = self.problem.limits if limits is None else limits
        self.limits = {r: float(lim[r]) for r in self.problem.limits}
        self.t = 0
        self.used = dict.fromkeys(self.limits, 0.0)
        self.choice = np.zeros(self.n, dtype=np.int64)
        self.prev = 0.0
        self.clamped = 0

    def observation(self) -> np.ndarray:
        if self.t >= self.n:
            return np.zeros(len(FEATURES), dtype=np.float32)
        obs = self.static[self.t].copy()
        frac = 1.0
        for r, lim in self.limits.items():
            low, high = self.rest_min[r][self.t], self.rest_max[r][self.t]
            room = high - low
            left = lim - self.used[r] - low
            frac = min(frac, 1.0 if room <= 0 else float(np.clip(left / room, 0.0, 1.0)))
        obs[9] = frac
        obs[10] = self.prev
        return np.clip(obs, -OBS_BOUND, OBS_BOUND)

    def _fits(self, d: int, o: int) -> float:
        """How far option ``o`` of decision ``d`` goes over (0: it leaves room for the rest)."""
        over = 0.0
        for r, lim in self.limits.items():
            need = self.used[r] + self.costs[r][d, o] + self.rest_min[r][d + 1]
            over += max(0.0, need - lim * (1 + RTOL)) / max(abs(lim), 1e-300)
        return over

    def rung_for(self, action: float) -> int:
        k = len(self.ladder[self.t])
        a = float(np.clip(action, 0.0, 1.0)) if math.isfinite(action) else 0.0
        return min(int(a * k), k - 1)

    def step(self, action: float) -> tuple[float, bool]:
        if self.t >= self.n:
            raise RuntimeError("step after the episode ended; call reset()")
        d = self.t
        lad = self.ladder[d]
        want = self.rung_for(action)
        got = want
        while got > 0 and self._fits(d, int(lad[got])) > 0:
            got -= 1
        if self._fits(d, int(lad[got])) > 0:  # several budgets: least overflow instead
            overs = [self._fits(d, int(o)) for o in lad]
            got = int(np.argmin(overs))
        o = int(lad[got])
        self.choice[d] = o
        for r in self.limits:
            self.used[r] += self.costs[r][d, o]
        k = len(lad)
        reward = 0.0
        if got < want:
            self.clamped += 1
            reward -= self.cliff * (want - got) / max(k - 1, 1) / max(self.n, 1)
        if self.shaped:
            reward -= float(self.problem.distortion[d, o]) / self.scale
        self.prev = got / max(k - 1, 1)
        self.t += 1
        finished = self.t >= self.n
        if finished and self.measure is not None:
            if self._measure_scale is None:
                self._measure_scale = max(abs(self.measure(self.cheapest)), 1e-300)
            # Swap the table's estimate, paid step by step, for the measured value.
            table = self.problem.distortion_of(self.choice) / self.scale if self.shaped else 0.0
            reward -= self.measure(self.choice) / self._measure_scale - table
        return reward * self.reward_scale, finished

    def run(self, policy: Any, limits: Mapping[str, float] | None = None) -> np.ndarray:
        """The plan of ``policy(obs) -> action`` from a fresh episode."""
        self.reset(limits)
        finished = self.n == 0
        while not finished:
            _, finished = self.step(float(np.asarray(policy(self.observation())).ravel()[0]))
        return self.choice.copy()


def _check_budgets(problem: AllocationProblem, budgets: Sequence[Mapping[str, float]]) -> None:
    for b in budgets:
        if set(b) != set(problem.limits):
            raise MpqError(
                f"training budget {dict(b)} must name the problem's budgeted resources "
                f"{sorted(problem.limits)}"
            )
        mins = problem.min_costs()
        for r, v in b.items():
            if not math.isfinite(float(v)) or mins[r] > float(v) * (1 + RTOL):
                raise MpqError(f"training budget {r}={v} is infeasible (the least is {mins[r]:g})")


def train_sac(
    problem: AllocationProblem,
    *,
    total_timesteps: int,
    seed: int = 0,
    measure: Measure | None = None,
    budgets: Sequence[Mapping[str, float]] | None = None,
    features: np.ndarray | None = None,
    cliff: float = 1.0,
    reward_scale: float = 10.0,
    shaped: bool = True,
    learning_starts: int | None = None,
    net_arch: Sequence[int] = (64, 64),
    checkpoint_every: int = 10,
    **sac_kwargs: Any,
) -> Any:
    """A stable-baselines3 ``SAC`` trained on ``problem`` for ``total_timesteps`` steps (one
    per decision). ``budgets``: limits to draw from, one per episode (default: the problem's
    own), to train a policy meant for several budgets. Returns the model; the environment it
    trained on is ``model.get_env()`` (its ``envs[0].unwrapped`` keeps ``best`` = (value,
    choice) of the best plan met at the problem's own budget, and ``checkpoint_*`` the best
    plan of the deterministic policy, tried every ``checkpoint_every`` episodes and at the
    end)."""
    from stable_baselines3 import SAC

    from mpq.solvers._sac_env import AllocationEnv, PolicyCheckpoints

    validate_problem(problem)
    if int(total_timesteps) != total_timesteps or total_timesteps < 1:
        raise MpqError(f"total_timesteps={total_timesteps} must be a positive integer")
    if budgets is not None:
        _check_budgets(problem, budgets)
    score = cached(measure, problem) if measure is not None else None
    episode = AllocationEpisode(
        problem,
        features=features,
        measure=score,
        cliff=cliff,
        reward_scale=reward_scale,
        shaped=shaped,
    )
    env = AllocationEnv(episode, budgets=budgets)
    starts = learning_starts if learning_starts is not None else min(100, total_timesteps // 4)
    kwargs: dict[str, Any] = {
        "learning_rate": 3e-4,
        "buffer_size": max(int(total_timesteps), 1000),
        "batch_size": 64,
        "gamma": 0.99,
        "train_freq": 1,
        "gradient_steps": 1,
        "policy_kwargs": {"net_arch": list(net_arch)},
        "device": "cpu",
        "verbose": 0,
    }
    kwargs.update(sac_kwargs)
    model = SAC("MlpPolicy", env, seed=seed, learning_starts=starts, **kwargs)
    checkpoints = PolicyCheckpoints(env, checkpoint_every)
    model.learn(total_timesteps=int(total_timesteps), callback=checkpoints)
    checkpoints.checkpoint()
    return model


def policy_plan(
    model: Any,
    problem: AllocationProblem,
    *,
    features: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """The deterministic plan of a trained ``model`` on ``problem`` (any budget, any size)
    and the number of clamped steps."""
    episode = AllocationEpisode(problem, features=features)

    def act(obs: np.ndarray) -> float:
        action, _ = model.predict(obs, deterministic=True)
        return float(np.asarray(action).ravel()[0])

    choice = episode.run(act)
    return choice, episode.clamped


def solve_sac(
    problem: AllocationProblem,
    measure: Measure | None = None,
    *,
    total_timesteps: int = 2000,
    seed: int = 0,
    model: Any = None,
    features: np.ndarray | None = None,
    **train_kwargs: Any,
) -> Solution:
    """RAMP's SAC agent on ``problem``: trains one (``total_timesteps`` steps, seeded) unless
    ``model`` is given (a trained policy: transfer, no training), then allocates. Status
    ``feasible``, or ``infeasible`` with ``min_feasible``. ``stats``: ``measured``, ``source``
    (``policy``, ``checkpoint`` or ``training``, see the module docstring), ``clamped``
    (policy steps the budget clamp lowered), ``policy_measured`` (the final policy's plan),
    ``train_s``, ``timesteps``."""
    t0 = time.perf_counter()
    validate_problem(problem)
    if not problem.limits:
        raise MpqError("sac needs a budget on at least one resource")
    if over_min(problem):
        return infeasible(problem, "sac", time.perf_counter() - t0)
    score = cached(measure, problem)
    train_s = 0.0
    candidates: list[tuple[float, int, str, np.ndarray]] = []
    if model is None:
        t1 = time.perf_counter()
        model = train_sac(
            problem,
            total_timesteps=total_timesteps,
            seed=seed,
            measure=score if measure is not None else None,
            features=features,
            **train_kwargs,
        )
        train_s = time.perf_counter() - t1
        env = model.get_env().envs[0].unwrapped
        if env.checkpoint_choice is not None:
            candidates.append(
                (score(env.checkpoint_choice), 1, "checkpoint", env.checkpoint_choice)
            )
        if env.best_choice is not None:
            candidates.append((score(env.best_choice), 2, "training", env.best_choice))
        timesteps = int(total_timesteps)
    else:
        timesteps = 0
    choice, clamped = policy_plan(model, problem, features=features)
    stats: dict[str, Any] = {
        "clamped": clamped,
        "train_s": train_s,
        "timesteps": timesteps,
        "seed": seed,
    }
    if not problem.feasible(choice):
        choice, _, ok = repair_downgrades(problem, choice)
        stats["repaired"] = True
        if not ok or not problem.feasible(choice):
            from mpq.solvers.ilp import solve_ilp

            ilp = solve_ilp(problem)
            if ilp.status == "infeasible":
                return replace(ilp, solver="sac", wall_time=time.perf_counter() - t0)
            choice = np.asarray(ilp.choice, dtype=np.int64)
            stats["fallback"] = "ilp"
    value = score(choice)
    stats["policy_measured"] = value
    candidates.append((value, 0, "policy", choice))
    value, _, source, choice = min(candidates, key=lambda c: (c[0], c[1]))
    stats["source"] = source
    stats["measured"] = value
    stats["measure_calls"] = score.calls
    return done(problem, np.asarray(choice).copy(), "feasible", "sac", t0, stats)


def from_options(opts: SearchOptions, features: Features) -> Search:
    """The ``sac`` search of :data:`mpq.registry.SEARCHES`: RAMP's agent on the problem's
    per-decision ``features``, trained ``opts.timesteps`` steps."""

    def search(problem: AllocationProblem, measure: Measure | None = None) -> Solution:
        return solve_sac(
            problem,
            measure,
            total_timesteps=opts.timesteps,
            seed=opts.seed,
            features=features(problem),
        )

    return search
