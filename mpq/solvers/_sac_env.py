"""The gymnasium environment of the SAC agent and its checkpoint callback (imports gymnasium
and stable-baselines3: load it lazily).

The logic lives in :class:`mpq.solvers.sac.AllocationEpisode` (numpy only); this wraps it in the
gymnasium API: ``observation_space`` = Box(-OBS_BOUND, OBS_BOUND, (len(FEATURES),)),
``action_space`` = Box(-1, 1, (1,)) (the water level's price scaled by
``PRICE_BASE ** -action``), one step per decision, ``terminated`` after the last one, never
``truncated``. Observations are clipped to [-OBS_BOUND, OBS_BOUND] (within [-4, 2] on any
sane problem).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from mpq.solvers.sac import FEATURES, OBS_BOUND, AllocationEpisode


class AllocationEnv(gym.Env):
    """One episode = one plan. ``budgets``: limits to draw one from per episode (default: the
    problem's). ``others``: more (episode, budgets) pairs; each episode first draws one of the
    problems (the first, ``episode``, included), then one of its budgets. ``best_choice`` /
    ``best_value``: the best plan completed at the problem's own limits (by the episode's
    measure, else the table distortion); ``checkpoint_choice`` /
    ``checkpoint_value``: the best plan of the deterministic policy at a checkpoint
    (:class:`PolicyCheckpoints`)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        episode: AllocationEpisode,
        budgets: Sequence[Mapping[str, float]] | None = None,
        others: Sequence[tuple[AllocationEpisode, Sequence[Mapping[str, float]]]] = (),
    ) -> None:
        super().__init__()
        self.episode = episode
        self.budgets = [dict(b) for b in budgets] if budgets else None
        self.pool = [(episode, self.budgets)] + [
            (ep, [dict(b) for b in bs] or None) for ep, bs in others
        ]
        self.current = episode
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (len(FEATURES),), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.best_choice: np.ndarray | None = None
        self.best_value = float("inf")
        self.checkpoint_choice: np.ndarray | None = None
        self.checkpoint_value = float("inf")
        self.checkpoint_episode = -1
        self._own = True
        self.episodes = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        limits = None
        if options and "limits" in options:
            self.current, limits = self.episode, options["limits"]
        else:
            self.current, budgets = self.pool[int(self.np_random.integers(len(self.pool)))]
            if budgets:
                limits = budgets[int(self.np_random.integers(len(budgets)))]
        self.current.reset(limits)
        own = self.episode.problem.limits
        self._own = self.current is self.episode and all(
            np.isclose(self.episode.limits[r], float(own[r]), rtol=1e-12) for r in own
        )
        return self.current.observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        ep = self.current
        reward, finished = ep.step(float(np.asarray(action).ravel()[0]))
        info: dict[str, Any] = {}
        if finished:
            self.episodes += 1
            choice = ep.choice.copy()
            info["choice"] = choice
            info["clamped"] = ep.clamped
            problem = self.episode.problem
            if self._own and problem.feasible(choice):
                measure = self.episode.measure
                value = measure(choice) if measure is not None else problem.distortion_of(choice)
                if value < self.best_value:
                    self.best_value, self.best_choice = value, choice
        return ep.observation(), float(reward), finished, False, info


class PolicyCheckpoints(BaseCallback):
    """Every ``every`` finished episodes, the deterministic policy allocates the problem at its
    own limits (a fresh episode, apart from training) and the best such plan is kept on the
    environment: SAC's last policy is not always its best (on 100 decisions it was 23% off
    the optimum after 5000 steps and 156% after 20000)."""

    def __init__(self, env: AllocationEnv, every: int) -> None:
        super().__init__(verbose=0)
        self.env = env
        self.every = max(int(every), 1)
        self.seen = 0

    def _on_step(self) -> bool:
        if self.env.episodes >= self.seen + self.every:
            self.seen = self.env.episodes
            self.checkpoint()
        return True

    def checkpoint(self) -> None:
        from mpq.solvers.sac import policy_plan

        episode = self.env.episode
        choice, _ = policy_plan(self.model, episode.problem, features=episode.static_input)
        problem = episode.problem
        if not problem.feasible(choice):
            return
        measure = episode.measure
        value = measure(choice) if measure is not None else problem.distortion_of(choice)
        if value < self.env.checkpoint_value:
            self.env.checkpoint_value, self.env.checkpoint_choice = value, choice
            self.env.checkpoint_episode = self.env.episodes
