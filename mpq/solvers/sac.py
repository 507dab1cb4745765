"""Bit allocation by reinforcement learning: RAMP's agent (Gautam and Jha, "RAMP: Reinforcement
Adaptive Mixed-Precision Quantization for Efficient On-Device LLM Inference", 2026), a Soft
Actor-Critic (Haarnoja et al. 2018; stable-baselines3) acting once per decision, in model order,
in a gymnasium environment.

**Why the first version failed** (free rung per step, reward = minus the distortion, 20000
steps: 17.6% above the ILP on 100 synthetic decisions, 57.6% on SmolLM2's table): the agent had
to discover the budget's price from a terminal-ish signal over 100-200 steps (credit
assignment), the clamp turned every over-ask into a cliff late in the episode, and with rewards
of order 1 split over 120 steps SAC's entropy bonus dominated. This version keeps SAC and the
one-decision-per-step episode but changes what the agent decides and what it is paid:

**Action**: one number ``a`` in [-1, 1], relative to the *water level* of the LP relaxation of
the decisions still to place (:mod:`mpq.solvers._water`: the price at which their hull options
exactly spend the budget left). The decision takes the option the LP would give it at
``price x PRICE_BASE ** -a`` (a = 0: follow the level; 1: a quarter of the price, so more
bits; -1: four times), then the budget clamp. The actor's output layer starts at zero, so an
untrained agent *is* the water level, and training learns deviations from it.

**Reward** (potential-based shaping, Ng et al. 1999, with gamma = 1): each step pays minus its
distortion plus the change of minus the LP value of the rest (normalized by the LP bound at the
start), so an episode returns ``(LP bound - plan) / LP bound`` (at most 0; about -0.001 for a
good plan on 100+ decisions), and each step is paid at once for what it cost against the LP.
Rewards are multiplied by ``reward_scale`` (100 in training). After the last decision the
budget left is spent by cheapest upgrades (the clamp's counterpart: a plan never wastes
budget). With a ``measure``, the last step swaps the table's return for
``(m(level plan) - m(plan)) / m(level plan)``: the measured gain over the water level's plan.

**Observation**: 18 dimensionless numbers (``FEATURES``), so a policy transfers across
budgets and problems:

====  ==============  ==================================================================
 0    ``depth``       decision index / (decisions - 1)
 1    ``kind``        module type code: linear 0, conv2d 0.5, embedding 1 (0 if unknown)
 2    ``log_rows``    log2(output rows) / 16 (0 if unknown)
 3    ``log_cols``    log2(input columns x kernel) / 16 (0 if unknown)
 4    ``log_size``    log2(parameter count / mean over decisions) / 8, clipped to [-1, 1];
                      without features, the decision's cost span stands in for its size
 5    ``sens_low``    ln(distortion at the cheapest option / its mean) / 8, in [-2, 2]
 6    ``sens_high``   ln(distortion at the dearest option / the same mean) / 8, in [-4, 2]
 7    ``w_std``       (log10(weight std) + 3) / 3 (0 if unknown)
 8    ``w_kurt``      log1p(max(excess kurtosis, 0)) / 5 (0 if unknown)
 9    ``budget``      budget left for the decisions left, 0 (all cheapest) .. 1 (all
                      dearest), the least over budgeted resources
 10   ``prev``        the previous decision's rung / (its rungs - 1)
 11   ``hint``        the rung the water level gives this decision / (rungs - 1)
 12   ``level``       log(water level now / at the start) / 4, in [-2, 2]: > 0 when
                      earlier steps spent more than the LP would have
 13   ``step_in``     log(price of the hull step into the hint / water level) / 4, in
                      [0, 2] (2: the cheapest vertex): how near the level is to a downgrade
 14   ``step_out``    log(water level / price of the step out of the hint) / 4, in [0, 2]
                      (2: the dearest vertex): how near the level is to an upgrade
 15   ``lump_cost``   the cost of the hull step the LP buys only in part (the *lump*) / (it
                      + the budget left above the cheapest options), in [0, 1]
 16   ``lump_frac``   the part of the lump the LP buys, in [0, 1)
 17   ``lump_ahead``  (the lump's decision - this one) / (decisions - 1), 0 without a lump
====  ==============  ==================================================================

Per-decision features (kind, rows, cols, parameter count, weight std and kurtosis) come from
``features=`` or ``problem.meta["features"]`` (``[decisions, 6]``, NaN where unknown;
:func:`mpq.calib_measure.decision_features` builds it from a model's targets). Several budgeted
resources: one water level per resource, and the decision takes the cheapest of their answers;
a plan that still ends over a budget is repaired by cheapest downgrades, and only if that fails
the ILP says whether any plan fits (``stats["fallback"]``).

**The shipped policy** (``policies/sac_policy_v2.safetensors``, made by
``experiments/bench/train_sac_policy.py``): SAC from the water level never beat its start on
held-out problems (a plan 1% off the optimum is a return of -0.01 over 100+ steps, under the
noise of SAC's exploration and critic), so the actor is pre-trained by imitating the exact ILP
(:mod:`mpq.solvers._sac_imitate`, DAgger on synthetic tables and SmolLM2's Fisher table at
several budgets), and the weights are kept only where they beat the water level on held-out
problems. Zero-shot, :func:`solve_sac` returns the best of the policy's plan and two starts:
the water level alone and the *rounded* level (``AllocationEpisode(rounding=True)``,
:mod:`mpq.solvers._water`: the LP's partly bought step, when it is a large decision's, fixed
first at its better side; one budgeted resource only). The rounded level is what brings
MobileNetV2 at 5 bits from 10.8% to 0.09% above the ILP: the plain level leaves its
classifier at 3 bits after the small layers spent the budget it needed. The policy does not
read the model's own features (columns 1-3, 7, 8: zero weights), which its training tables
lack. :func:`solve_sac` uses it zero-shot (numpy only,
:class:`NumpyActor`) or fine-tunes it with SAC for ``total_timesteps`` on the problem at hand
(and its ``measure``). Policy files are safetensors (arrays only) with the format, version and
feature list in the header, refused when they do not match; version 1 (the untrained water
level, 13 features) still loads. Figures: BENCHMARKS.md ("Search policies", issue 17).
stable-baselines3, gymnasium and torch are imported inside the functions that train;
importing this module stays numpy-only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.files import atomic_write
from mpq.solvers._common import RTOL, done, fill_upgrades, over_min, repair_downgrades
from mpq.solvers._water import Level, WaterLevel
from mpq.solvers.base import AllocationProblem, Solution, infeasible, validate_problem
from mpq.solvers.measure import CachedMeasure, Measure, cached, ladders
from mpq.solvers.options import Features, Search, SearchOptions

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
    "hint",
    "level",
    "step_in",
    "step_out",
    "lump_cost",
    "lump_frac",
    "lump_ahead",
)
V1_FEATURES = FEATURES[:13]  # the observation of version-1 policies (a prefix of this one)
FEATURE_COLUMNS = ("kind", "rows", "cols", "numel", "weight_std", "weight_kurtosis")
OBS_BOUND = 16.0  # every observation is clipped to [-OBS_BOUND, OBS_BOUND]
PRICE_BASE = 4.0  # action a scales the water level's price by PRICE_BASE ** -a
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
    feature vector of the decision about to be placed (zeros once done). The action is in
    [-1, 1]: the decision takes the option the LP relaxation of the decisions left would give
    it at the water level times ``PRICE_BASE ** -action`` (0: follow the level; 1: a quarter
    of the price, so more bits; -1: four times, fewer), then the budget clamp. ``rounding``:
    the water level rounds the lump first (:meth:`mpq.solvers._water.WaterLevel.level`; with
    one budgeted resource only, else ignored)."""

    def __init__(
        self,
        problem: AllocationProblem,
        *,
        features: np.ndarray | None = None,
        measure: CachedMeasure | None = None,
        cliff: float = 0.0,
        reward_scale: float = 1.0,
        shaped: bool = True,
        fill: bool = True,
        rounding: bool = False,
    ) -> None:
        if not problem.limits:
            raise MpqError("sac needs a budget on at least one resource")
        self.problem = problem
        # Rounding the lump is a one-resource LP argument: with several budgets each
        # resource's level would fix the lump on its own, ignoring the others.
        self.rounding = bool(rounding) and len(problem.limits) == 1
        self.fill = bool(fill)
        self.filled = 0
        self.n = len(problem.decisions)
        self.ladder = ladders(problem)
        self.rank = np.full(problem.distortion.shape, -1, dtype=np.int64)
        for d, lad in enumerate(self.ladder):
            self.rank[d, lad] = np.arange(len(lad))
        self.static_input = features
        self.static = _static_features(problem, features)
        self.measure = measure
        self.cliff = float(cliff)
        self.reward_scale = float(reward_scale)
        self.shaped = bool(shaped) or measure is None
        self.costs = {r: np.asarray(problem.costs[r], dtype=float) for r in problem.limits}
        allowed = problem.allowed
        dist = np.where(allowed, problem.distortion, np.inf)
        self.water = {r: WaterLevel(dist, c, allowed) for r, c in self.costs.items()}
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
        self.cheapest = cheapest
        low = problem.distortion[idx, cheapest]
        self.rest_cheapest = np.append(np.cumsum(low[::-1])[::-1], 0.0)
        self.floor = max(float(problem.distortion[idx, cheapest].sum()) * 1e-12, 1e-300)
        self._ref_measured: dict[tuple[float, ...], float] = {}
        self._problems: dict[tuple[float, ...], AllocationProblem] = {}
        self.reset()

    def _levels(self) -> dict[str, Level]:
        return {
            r: w.level(self.t, self.limits[r] - self.used[r], self.rounding)
            for r, w in self.water.items()
        }

    def _potential(self) -> float:
        """Minus the LP value of the decisions left (normalized): the shaping potential."""
        if self.t >= self.n:
            return 0.0
        lp = max(lv.lp_value for lv in self.levels.values())
        return -lp / self.ref if math.isfinite(lp) else -self.rest_cheapest[self.t] / self.ref

    def reset(self, limits: Mapping[str, float] | None = None) -> None:
        lim = self.problem.limits if limits is None else limits
        self.limits = {r: float(lim[r]) for r in self.problem.limits}
        self.filled = 0
        self.t = 0
        self.used = dict.fromkeys(self.limits, 0.0)
        self.choice = np.zeros(self.n, dtype=np.int64)
        self.prev = 0.0
        self.clamped = 0
        self.levels = self._levels() if self.n else {}
        self.start_levels = dict(self.levels)
        lp0 = max((lv.lp_value for lv in self.levels.values()), default=0.0)
        top = float(self.rest_cheapest[0]) if self.n else 0.0
        self.lp0 = lp0 if math.isfinite(lp0) else top
        self.ref = max(self.lp0, self.floor)

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
        k = len(self.ladder[self.t])
        obs[11] = self.rank[self.t, self.target(0.0)] / max(k - 1, 1)
        obs[12] = self._level_change()
        obs[13:18] = self._lp_features()
        return np.clip(obs, -OBS_BOUND, OBS_BOUND)

    def _lp_features(self) -> np.ndarray:
        """``step_in``, ``step_out``, ``lump_cost``, ``lump_frac``, ``lump_ahead`` (see the
        module docstring) on the resource whose water level decides the hint."""
        out = np.zeros(5)
        d, best, which = self.t, -1, None
        for r, lv in self.levels.items():
            o = self.water[r].vertex(d, self.water[r].price_of(d, lv))
            if best < 0 or self.rank[d, o] < self.rank[d, best]:
                best, which = o, r
        if which is None:
            return out
        lv = self.levels[which]
        price = self.water[which].price_of(d, lv)
        if not math.isfinite(price):
            return out
        into, step_out = self.water[which].step_prices(d, price)
        out[0] = 2.0 if price <= 0 or not math.isfinite(into) else math.log(into / price) / 4
        out[1] = 2.0 if step_out <= 0 or price <= 0 else math.log(price / step_out) / 4
        if lv.lump_dec >= 0:
            out[2] = lv.lump_cost / max(lv.lump_cost + lv.extra, 1e-300)
            out[3] = lv.lump_frac
            out[4] = (lv.lump_dec - d) / max(self.n - 1, 1)
        return np.clip(out, 0.0, 2.0)

    def _level_change(self) -> float:
        """log(water level now / at the episode's start) / 4, clipped to [-2, 2] (the most
        binding resource): > 0 when earlier steps spent more than the LP would have."""
        out = -2.0
        for r, lv in self.levels.items():
            p0, p = self.start_levels[r].price, lv.price
            if p == p0:
                v = 0.0
            elif p0 <= 0 or not math.isfinite(p) or p <= 0 or not math.isfinite(p0):
                v = 2.0 if (p > p0) else -2.0
            else:
                v = float(np.clip(math.log(p / p0) / 4, -2.0, 2.0))
            out = max(out, v)
        return out

    def target(self, action: float) -> int:
        """The option the LP's water level, scaled by ``PRICE_BASE ** -action``, gives the
        decision at hand (the cheapest of the per-resource answers)."""
        d = self.t
        a = float(np.clip(action, -1.0, 1.0)) if math.isfinite(action) else 0.0
        scale = PRICE_BASE ** (-a)
        best = -1
        for r, lv in self.levels.items():
            price = self.water[r].price_of(d, lv)
            price = price * scale if math.isfinite(price) else price
            o = self.water[r].vertex(d, price)
            if best < 0 or self.rank[d, o] < self.rank[d, best]:
                best = o
        return best

    def _fits(self, d: int, o: int) -> float:
        """How far option ``o`` of decision ``d`` goes over (0: it leaves room for the rest)."""
        over = 0.0
        for r, lim in self.limits.items():
            need = self.used[r] + self.costs[r][d, o] + self.rest_min[r][d + 1]
            over += max(0.0, need - lim * (1 + RTOL)) / max(abs(lim), 1e-300)
        return over

    def step(self, action: float) -> tuple[float, bool]:
        if self.t >= self.n:
            raise RuntimeError("step after the episode ended; call reset()")
        d = self.t
        lad = self.ladder[d]
        want = int(self.rank[d, self.target(action)])
        got = want
        while got > 0 and self._fits(d, int(lad[got])) > 0:
            got -= 1
        if self._fits(d, int(lad[got])) > 0:  # several budgets: least overflow instead
            overs = [self._fits(d, int(o)) for o in lad]
            got = int(np.argmin(overs))
        o = int(lad[got])
        before = self._potential()
        self.choice[d] = o
        for r in self.limits:
            self.used[r] += self.costs[r][d, o]
        k = len(lad)
        reward = 0.0
        if got < want:
            self.clamped += 1
            reward -= self.cliff * (want - got) / max(k - 1, 1) / max(self.n, 1)
        self.prev = got / max(k - 1, 1)
        self.t += 1
        finished = self.t >= self.n
        self.levels = self._levels() if not finished else {}
        gained = 0.0
        if finished and self.fill:
            # Spend what the budget leaves (the clamp's counterpart: a plan never wastes it).
            before_fill = self.problem.distortion_of(self.choice)
            at = self._at_limits()
            weight = {r: 1.0 / max(abs(v), 1e-300) for r, v in self.limits.items()}
            self.choice, self.filled = fill_upgrades(at, self.choice, weight)
            gained = before_fill - self.problem.distortion_of(self.choice)
        if self.shaped:
            # Potential-based shaping: minus this step's distortion plus the change of minus
            # the LP value of the rest; an episode sums to (LP bound - plan) / LP bound.
            step = -float(self.problem.distortion[d, o]) + gained
            reward += step / self.ref + self._potential() - before
        if finished and self.measure is not None:
            # Swap the table's return for the measured one, relative to the plan the water
            # level alone (action 0) makes at these limits.
            ref = self._reference_measured()
            table = (self.lp0 - self.problem.distortion_of(self.choice)) / self.ref
            reward += (ref - self.measure(self.choice)) / max(abs(ref), 1e-300) - (
                table if self.shaped else 0.0
            )
        return reward * self.reward_scale, finished

    def _at_limits(self) -> AllocationProblem:
        """The problem with this episode's limits (cached per limits)."""
        key = tuple(self.limits[r] for r in sorted(self.limits))
        if key not in self._problems:
            p = self.problem
            self._problems[key] = AllocationProblem(
                p.decisions, p.options, p.distortion, p.costs, dict(self.limits), p.meta
            )
        return self._problems[key]

    def _reference_measured(self) -> float:
        assert self.measure is not None
        key = tuple(self.limits[r] for r in sorted(self.limits))
        if key not in self._ref_measured:
            saved = (self.t, dict(self.used), self.choice.copy(), self.prev, self.clamped)
            levels, start = self.levels, self.start_levels
            plan = self.run(lambda obs: 0.0, self.limits)
            self._ref_measured[key] = self.measure(plan)
            self.t, self.used, self.choice, self.prev, self.clamped = saved
            self.levels, self.start_levels = levels, start
        return self._ref_measured[key]

    def run(self, policy: Any, limits: Mapping[str, float] | None = None) -> np.ndarray:
        """The plan of ``policy(obs) -> action`` from a fresh episode."""
        measure, self.measure = self.measure, None  # the plan only: no measured reward
        try:
            self.reset(limits)
            finished = self.n == 0
            while not finished:
                _, finished = self.step(float(np.asarray(policy(self.observation())).ravel()[0]))
            return self.choice.copy()
        finally:
            self.measure = measure


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


PRETRAINED = Path(__file__).parent / "policies" / "sac_policy_v2.safetensors"
POLICY_FORMAT = "mpq-sac-policy"
POLICY_VERSION = "2"
# The observation each readable version was trained on: a version-1 policy reads the first 13
# features (no LP-rounding features) and still loads, for the figures made with it. A policy
# trained in episodes whose water level rounds the lump says so in its header (``rounding``
# "1"; absent: "0", as in the shipped v2).
VERSION_FEATURES = {"1": V1_FEATURES, "2": FEATURES}


class NumpyActor:
    """The deterministic action of a SAC actor (stable-baselines3's ``MlpPolicy``: ReLU
    layers, then ``tanh(mu)``) in numpy, from its weights: a policy can be used without torch.
    ``weights``: the policy's state dict (``actor.latent_pi.{0,2,..}``, ``actor.mu``); it reads
    the first ``inputs`` features of an observation (13 for a version-1 policy)."""

    def __init__(self, weights: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
        self.meta = dict(meta)
        self.weights = {k: np.asarray(v) for k, v in weights.items()}
        layers = sorted(
            {int(k.split(".")[2]) for k in self.weights if k.startswith("actor.latent_pi.")}
        )
        self.layers = [
            (
                self.weights[f"actor.latent_pi.{i}.weight"].astype(np.float64),
                self.weights[f"actor.latent_pi.{i}.bias"].astype(np.float64),
            )
            for i in layers
        ]
        self.mu = (
            self.weights["actor.mu.weight"].astype(np.float64),
            self.weights["actor.mu.bias"].astype(np.float64),
        )
        self.inputs = int(self.layers[0][0].shape[1] if self.layers else self.mu[0].shape[1])
        # The episode the policy was trained in: with the lump rounded (version 3) or not.
        self.rounding = self.meta.get("rounding", "0") == "1"

    def __call__(self, obs: np.ndarray) -> float:
        h = np.asarray(obs, dtype=np.float64).ravel()[: self.inputs]
        for w, b in self.layers:
            h = np.maximum(w @ h + b, 0.0)
        return float(np.tanh(self.mu[0] @ h + self.mu[1])[0])


def save_weights(
    state: Mapping[str, np.ndarray], path: Path, meta: Mapping[str, str] | None = None
) -> None:
    """Policy weights (a state dict of arrays: at least ``actor.latent_pi.*`` and
    ``actor.mu.*``) as safetensors, with the format, version and feature list in the header
    (no pickle)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    header = {
        "format": POLICY_FORMAT,
        "version": POLICY_VERSION,
        "features": ",".join(FEATURES),
        "price_base": repr(PRICE_BASE),
        "net_arch": ",".join(
            str(w.shape[0])
            for k, w in sorted(arrays.items())
            if k.startswith("actor.latent_pi.") and k.endswith(".bias")
        ),
        **dict(meta or {}),
    }
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=header))


def save_policy(model: Any, path: Path, meta: Mapping[str, str] | None = None) -> None:
    """A trained SAC's policy weights (actor and critics): :func:`save_weights`."""
    state = {k: v.detach().cpu().numpy() for k, v in model.policy.state_dict().items()}
    save_weights(state, path, meta)


def load_policy(path: Path = PRETRAINED) -> NumpyActor:
    """A policy written by :func:`save_weights` (safetensors: arrays only, nothing executed);
    refused with the reason when it is not one, or not for a version's features."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise MpqError(
            f"no SAC policy at {path}; train one with experiments/bench/train_sac_policy.py"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises its own types for a corrupt header
        raise MpqError(f"{path} is not a readable safetensors file ({err})") from err
    version = meta.get("version", "")
    if meta.get("format") != POLICY_FORMAT or version not in VERSION_FEATURES:
        raise MpqError(
            f"{path} is a {meta.get('format')!r} v{meta.get('version')} file; this mpq reads "
            f"{POLICY_FORMAT} v{', v'.join(VERSION_FEATURES)} "
            "(retrain: experiments/bench/train_sac_policy.py)"
        )
    want = VERSION_FEATURES[version]
    if meta.get("features") != ",".join(want):
        raise MpqError(
            f"{path} was trained on features {meta.get('features')}, not {','.join(want)} "
            f"(version {version})"
        )
    try:
        actor = NumpyActor(weights, meta)
    except (KeyError, IndexError, ValueError) as err:
        raise MpqError(f"{path} does not hold an actor's weights ({err})") from err
    if actor.inputs != len(want):
        raise MpqError(f"{path}: its actor reads {actor.inputs} features, not {len(want)}")
    return actor


def train_sac(
    problem: AllocationProblem,
    *,
    total_timesteps: int,
    seed: int = 0,
    measure: Measure | None = None,
    budgets: Sequence[Mapping[str, float]] | None = None,
    features: np.ndarray | None = None,
    others: Sequence[tuple[AllocationProblem, Sequence[Mapping[str, float]]]] = (),
    init: NumpyActor | None = None,
    rounding: bool | None = None,
    n_envs: int = 1,
    cliff: float = 0.0,
    reward_scale: float = 100.0,
    shaped: bool = True,
    learning_starts: int | None = None,
    net_arch: Sequence[int] = (64, 64),
    checkpoint_every: int = 10,
    callbacks: Sequence[Any] = (),
    **sac_kwargs: Any,
) -> Any:
    """A stable-baselines3 ``SAC`` trained on ``problem`` for ``total_timesteps`` steps (one
    per decision). ``budgets``: limits to draw from, one per episode (default: the problem's
    own), to train a policy meant for several budgets; ``others``: more (problem, budgets)
    to draw episodes from (a policy meant for several models); ``n_envs``: environments
    stepped together (``DummyVecEnv``); ``init``: start from these policy weights (e.g. the
    shipped policy, to fine-tune). Returns the model; ``model.get_env().envs[0].unwrapped``
    keeps the best plan met at the problem's own budget (``best_*``) and the best plan of the
    deterministic policy, tried every ``checkpoint_every`` episodes and at the end
    (``checkpoint_*``)."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import DummyVecEnv

    from mpq.solvers._sac_env import AllocationEnv, PolicyCheckpoints

    validate_problem(problem)
    if int(total_timesteps) != total_timesteps or total_timesteps < 1:
        raise MpqError(f"total_timesteps={total_timesteps} must be a positive integer")
    if budgets is not None:
        _check_budgets(problem, budgets)
    for q, bs in others:
        validate_problem(q)
        _check_budgets(q, bs)
    score = cached(measure, problem) if measure is not None else None
    rounds = rounding if rounding is not None else (init is not None and init.rounding)

    def make_env() -> AllocationEnv:
        def episode(q: AllocationProblem, m: CachedMeasure | None) -> AllocationEpisode:
            return AllocationEpisode(
                q,
                features=features if q is problem else None,
                measure=m,
                cliff=cliff,
                reward_scale=reward_scale,
                shaped=shaped,
                rounding=rounds,
            )

        pool = [(episode(q, None), bs) for q, bs in others]
        return AllocationEnv(episode(problem, score), budgets=budgets, others=pool)

    envs = [make_env() for _ in range(max(int(n_envs), 1))]
    vec = DummyVecEnv([lambda e=e: e for e in envs])  # type: ignore[misc]
    starts = learning_starts if learning_starts is not None else min(100, total_timesteps // 4)
    kwargs: dict[str, Any] = {
        "learning_rate": 3e-4,
        "buffer_size": max(int(total_timesteps), 1000),
        "batch_size": 64,
        "gamma": 1.0,  # episodic, and the shaping potential is exact with gamma = 1
        "train_freq": 1,
        "gradient_steps": 1,
        "policy_kwargs": {"net_arch": list(net_arch)},
        "device": "cpu",
        "verbose": 0,
    }
    kwargs.update(sac_kwargs)
    model = SAC("MlpPolicy", vec, seed=seed, learning_starts=starts, **kwargs)
    # SB3's default logger makes a folder tmp/SB3-<time> even when it writes nothing there.
    model.set_logger(Logger(folder=None, output_formats=[]))
    if init is None:
        import torch

        # The actor starts at action 0 everywhere (the water level): training learns the
        # deviations from the LP's price, not the price itself.
        mu: Any = model.actor.mu
        with torch.no_grad():
            mu.weight.zero_()
            mu.bias.zero_()
    else:
        import torch

        state = model.policy.state_dict()
        for k, v in init.weights.items():
            if k in state and tuple(state[k].shape) == v.shape:
                state[k] = torch.from_numpy(np.array(v, dtype=np.float32))
        model.policy.load_state_dict(state)
    checkpoints = PolicyCheckpoints(envs[0], checkpoint_every)
    model.learn(total_timesteps=int(total_timesteps), callback=[checkpoints, *callbacks])
    checkpoints.checkpoint()
    return model


def _actor(model: Any) -> Any:
    """``obs -> action`` of a model: a :class:`NumpyActor` as is, else an SB3 model's
    deterministic prediction."""
    if isinstance(model, NumpyActor):
        return model

    def act(obs: np.ndarray) -> float:
        action, _ = model.predict(obs, deterministic=True)
        return float(np.asarray(action).ravel()[0])

    return act


def policy_plan(
    model: Any,
    problem: AllocationProblem,
    *,
    features: np.ndarray | None = None,
    rounding: bool | None = None,
) -> tuple[np.ndarray, int]:
    """The deterministic plan of a trained ``model`` (SB3 SAC or :class:`NumpyActor`) on
    ``problem`` (any budget, any size) and the number of clamped steps, in the episode
    the model was trained in (``rounding``: a :class:`NumpyActor`'s own; an SB3 model's:
    its environment's)."""
    if rounding is None:
        rounding = _trained_rounding(model)
    episode = AllocationEpisode(problem, features=features, rounding=rounding)
    choice = episode.run(_actor(model))
    return choice, episode.clamped


def _trained_rounding(model: Any) -> bool:
    if isinstance(model, NumpyActor):
        return model.rounding
    try:
        return bool(model.get_env().envs[0].unwrapped.episode.rounding)
    except AttributeError:
        return False


def level_plan(problem: AllocationProblem, rounding: bool = False) -> np.ndarray:
    """The plan of action 0 at every step: the water level alone, no learned policy (the
    baseline the agent is measured against); ``rounding``: with the lump rounded
    (:meth:`mpq.solvers._water.WaterLevel.level`)."""
    return AllocationEpisode(problem, rounding=rounding).run(lambda obs: 0.0)


def solve_sac(
    problem: AllocationProblem,
    measure: Measure | None = None,
    *,
    total_timesteps: int = 0,
    seed: int = 0,
    model: Any = None,
    features: np.ndarray | None = None,
    pretrained: bool | Path = True,
    level: bool = True,
    **train_kwargs: Any,
) -> Solution:
    """RAMP's SAC agent on ``problem``. ``model`` given: that policy, no training. Otherwise
    the shipped policy (``pretrained=True``; a path: that file; ``False``: a fresh network)
    is used as is when ``total_timesteps == 0`` (zero-shot), or fine-tuned for
    ``total_timesteps`` steps (seeded) on this problem, its budget and ``measure``. Status
    ``feasible``, or ``infeasible`` with ``min_feasible``. ``stats``: ``measured``,
    ``source`` (``policy``, ``checkpoint``, ``training``, ``water level`` / ``rounded level``
    (the plans of action 0 with the plain and the rounded water level, candidates unless
    ``level=False``) or, when fine-tuning, ``pretrained``: the shipped policy's plan before
    fine-tuning),
    ``clamped`` (policy steps the budget clamp lowered), ``policy_measured`` (the final
    policy's plan), ``train_s``, ``timesteps``, ``policy`` (which weights)."""
    t0 = time.perf_counter()
    validate_problem(problem)
    if not problem.limits:
        raise MpqError("sac needs a budget on at least one resource")
    if over_min(problem):
        return infeasible(problem, "sac", time.perf_counter() - t0)
    score = cached(measure, problem)
    train_s = 0.0
    candidates: list[tuple[float, int, str, np.ndarray]] = []
    init: NumpyActor | None = None
    source_policy = "given"
    if model is None and pretrained is not False:
        init = load_policy(PRETRAINED if pretrained is True else Path(pretrained))
        source_policy = str(init.meta.get("name", "pretrained"))
    if model is None and total_timesteps > 0:
        if init is not None:  # fine-tuning starts from this plan: it is a candidate too
            start, _ = policy_plan(init, problem, features=features)
            if problem.feasible(start):
                candidates.append((score(start), 3, "pretrained", start))
        t1 = time.perf_counter()
        model = train_sac(
            problem,
            total_timesteps=total_timesteps,
            seed=seed,
            measure=score if measure is not None else None,
            features=features,
            init=init,
            **train_kwargs,
        )
        source_policy = f"{source_policy if init is not None else 'fresh'}+fine-tuned"
        train_s = time.perf_counter() - t1
        env = model.get_env().envs[0].unwrapped
        if env.checkpoint_choice is not None:
            candidates.append(
                (score(env.checkpoint_choice), 1, "checkpoint", env.checkpoint_choice)
            )
        if env.best_choice is not None:
            candidates.append((score(env.best_choice), 2, "training", env.best_choice))
        timesteps = int(total_timesteps)
    elif model is None:
        if init is None:
            raise MpqError("sac with pretrained=False needs total_timesteps > 0 (or a model)")
        model = init
        timesteps = 0
    else:
        timesteps = 0
    choice, clamped = policy_plan(model, problem, features=features)
    stats: dict[str, Any] = {
        "clamped": clamped,
        "train_s": train_s,
        "timesteps": timesteps,
        "seed": seed,
        "policy": source_policy,
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
    if level:
        # The policy's start, the water level alone (plain, and with the lump rounded): a
        # learned policy that leaves it for the worse on a problem unlike its training tables
        # never costs more than its start.
        for rank, name, rounded in ((4, "water level", False), (5, "rounded level", True)):
            plan = level_plan(problem, rounding=rounded)
            fresh = not any(np.array_equal(plan, c[3]) for c in candidates)
            if fresh and problem.feasible(plan):
                candidates.append((score(plan), rank, name, plan))
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
