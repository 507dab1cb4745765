"""Pre-training the SAC actor by imitating the exact ILP (DAgger; Ross et al. 2011), on the
table's objective (torch imported inside :func:`fit_actor`).

SAC from the water level (action 0) never beat its start on held-out problems (BENCHMARKS.md,
"Search policies"): a plan 1% off the optimum is a return of -0.01 spread over 100+ steps,
below the noise of SAC's own exploration and critic, so every update made the actor worse. The
optimum itself is cheap on a table (the ILP, 0.01-0.4 s), so the actor learns it directly:

* **Labels.** At a state of an episode (decisions ``t..`` left, the budget left), the expert is
  the ILP optimum of the decisions left under the budget left; its option for decision ``t``
  is realized by an *interval* of actions (:func:`action_interval`: those whose scaled water
  level gives that option; when none does, those giving the nearest rung). The optimum of the
  rest stays optimal while the episode follows it (Bellman), so the ILP is solved again only
  after a step that leaves it.
* **States** (DAgger): round 0 follows the expert; later rounds follow the current actor, and
  each visited state is labelled by the expert, so the actor learns to recover from its own
  mistakes, not only the expert's states.
* **Fit**: the actor (ReLU MLP, ``tanh`` output, stable-baselines3's ``MlpPolicy`` actor
  layout) minimizes the distance of its action to the interval (0 inside it), starting
  from zero output (the water level), so it moves only where the ILP disagrees with the LP's
  rounding.

The result is saved as SAC policy weights (:func:`mpq.solvers.sac.save_weights`); SAC can
fine-tune it on a problem's measure (``solve_sac(total_timesteps=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mpq.solvers.base import AllocationProblem
from mpq.solvers.sac import FEATURES, AllocationEpisode

GRID = np.linspace(-1.0, 1.0, 41)  # the actions tried to find an option's interval
MARGIN = 0.02  # the fit aims this far inside an interval's inner ends (grid step 0.05)
Policy = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Labelled:
    """States and their action intervals: ``obs`` [N, features], ``lo`` / ``hi`` [N]."""

    obs: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @staticmethod
    def join(parts: Sequence[Labelled]) -> Labelled:
        if not parts:
            return Labelled(np.zeros((0, len(FEATURES)), np.float32), np.zeros(0), np.zeros(0))
        return Labelled(
            np.concatenate([p.obs for p in parts]),
            np.concatenate([p.lo for p in parts]),
            np.concatenate([p.hi for p in parts]),
        )


def action_interval(ep: AllocationEpisode, option: int) -> tuple[float, float]:
    """The least and largest action of :data:`GRID` whose target is ``option`` for the decision
    at hand (the rung nearest to it when no action reaches it): every action in between gives
    it too, since a higher action never gives a cheaper rung (so both ends are found by
    bisection)."""
    d = ep.t
    want = int(ep.rank[d, option])
    memo: dict[int, int] = {}

    def rank(i: int) -> int:
        if i not in memo:
            memo[i] = int(ep.rank[d, ep.target(float(GRID[i]))])
        return memo[i]

    last = len(GRID) - 1
    if rank(last) < want:  # the option is out of reach upward: the dearest reachable rung
        want = rank(last)
    elif rank(0) > want:
        want = rank(0)
    lo, hi = 0, last  # the first index with rank >= want
    while lo < hi:
        mid = (lo + hi) // 2
        if rank(mid) >= want:
            hi = mid
        else:
            lo = mid + 1
    first = lo
    if rank(first) > want:  # no action gives it: the nearer of the two rungs around it
        below = first - 1
        if want - rank(below) <= rank(first) - want:
            want, first = rank(below), below
            while first > 0 and rank(first - 1) == want:
                first -= 1
        else:
            want = rank(first)
    lo, hi = first, last  # the last index with rank <= want
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rank(mid) <= want:
            lo = mid
        else:
            hi = mid - 1
    return float(GRID[first]), float(GRID[lo])


def label_action(lo: float, hi: float) -> float:
    """The action of ``[lo, hi]`` nearest to 0 (the water level)."""
    return float(np.clip(0.0, lo, hi))


def aim(lo: float, hi: float) -> tuple[float, float]:
    """``[lo, hi]`` shrunk by :data:`MARGIN` at the ends inside (-1, 1), so a fitted action
    near an end still gives the option (the true end lies within a grid step outside)."""
    a = lo + MARGIN if lo > -1.0 else lo
    b = hi - MARGIN if hi < 1.0 else hi
    if a > b:
        a = b = 0.5 * (lo + hi)
    return a, b


def expert_rest(
    ep: AllocationEpisode, solve: Callable[[AllocationProblem], np.ndarray]
) -> np.ndarray:
    """The expert's options for decisions ``ep.t..`` under the budget left."""
    p, t = ep.problem, ep.t
    left = {r: max(ep.limits[r] - ep.used[r], float(ep.rest_min[r][t])) for r in ep.limits}
    sub = AllocationProblem(
        p.decisions[t:],
        p.options,
        p.distortion[t:],
        {r: c[t:] for r, c in ep.costs.items()},
        left,
    )
    return np.asarray(solve(sub), dtype=np.int64)


def collect(
    ep: AllocationEpisode,
    limits: Mapping[str, float],
    policy: Policy | None,
    solve: Callable[[AllocationProblem], np.ndarray],
) -> tuple[Labelled, int]:
    """One episode at ``limits``, following the expert (``policy`` None) or ``policy``; every
    state labelled by the expert. Returns the labels and the number of expert solves."""
    ep.reset(limits)
    rows: list[np.ndarray] = []
    los: list[float] = []
    his: list[float] = []
    plan: np.ndarray | None = None
    solves = 0
    finished = ep.n == 0
    while not finished:
        if plan is None or len(plan) == 0:
            plan = expert_rest(ep, solve)
            solves += 1
        obs = ep.observation()
        lo, hi = action_interval(ep, int(plan[0]))
        rows.append(obs)
        a, b = aim(lo, hi)
        los.append(a)
        his.append(b)
        action = label_action(lo, hi) if policy is None else float(policy(obs))
        t = ep.t
        _, finished = ep.step(action)
        plan = plan[1:] if ep.choice[t] == plan[0] else None
    obs_arr = np.array(rows, np.float32).reshape(-1, len(FEATURES))
    return Labelled(obs_arr, np.array(los), np.array(his)), solves


def fit_actor(
    data: Labelled,
    *,
    net_arch: Sequence[int] = (64, 64),
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    seed: int = 0,
    init: Mapping[str, np.ndarray] | None = None,
    ignore: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """An actor (``actor.latent_pi.{0,2,..}``, ``actor.mu``: ReLU layers, ``tanh`` output)
    fitted to put its action inside each state's interval (L1 distance outside it: an
    L2 one pulls too weakly near the ends).
    Starts from ``init`` or from zero output (the water level). Deterministic for a seed on
    one thread. ``ignore``: observation columns the actor must not read (zero in training,
    and their first-layer weights zero)."""
    import torch

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    linears: list[torch.nn.Linear] = []
    width = len(FEATURES)
    for h in net_arch:
        linears.append(torch.nn.Linear(width, h))
        layers += [linears[-1], torch.nn.ReLU()]
        width = h
    body = torch.nn.Sequential(*layers)
    mu = torch.nn.Linear(width, 1)
    with torch.no_grad():
        mu.weight.zero_()
        mu.bias.zero_()
    names = [f"actor.latent_pi.{i}" for i in range(0, 2 * len(net_arch), 2)]
    if init is not None:
        with torch.no_grad():
            for name, lin in zip(names, linears, strict=True):
                lin.weight.copy_(torch.from_numpy(np.asarray(init[f"{name}.weight"])))
                lin.bias.copy_(torch.from_numpy(np.asarray(init[f"{name}.bias"])))
            mu.weight.copy_(torch.from_numpy(np.asarray(init["actor.mu.weight"])))
            mu.bias.copy_(torch.from_numpy(np.asarray(init["actor.mu.bias"])))
    params = list(body.parameters()) + list(mu.parameters())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    keep = np.ones(len(FEATURES), np.float32)
    keep[list(ignore)] = 0.0
    x = torch.from_numpy(np.asarray(data.obs, np.float32) * keep)
    lo = torch.from_numpy(np.asarray(data.lo, np.float32))
    hi = torch.from_numpy(np.asarray(data.hi, np.float32))
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            a = torch.tanh(mu(body(x[idx]))).squeeze(-1)
            loss = (torch.relu(lo[idx] - a) + torch.relu(a - hi[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    out: dict[str, np.ndarray] = {}
    for name, lin in zip(names, linears, strict=True):
        out[f"{name}.weight"] = lin.weight.detach().numpy().copy()
        out[f"{name}.bias"] = lin.bias.detach().numpy().copy()
    first = "actor.latent_pi.0.weight" if net_arch else "actor.mu.weight"
    if net_arch:
        out[first] = out[first] * keep[None, :]
    out["actor.mu.weight"] = mu.weight.detach().numpy().copy()
    if not net_arch:
        out[first] = out[first] * keep[None, :]
    out["actor.mu.bias"] = mu.bias.detach().numpy().copy()
    return out
