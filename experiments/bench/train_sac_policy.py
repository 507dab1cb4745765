"""Train the SAC policy shipped with mpq (``mpq/solvers/policies/sac_policy_v1.safetensors``).

Episodes are drawn from synthetic tables (40..250 decisions, 4..6 bit-width options, stored
bits as the budget; distortion = sensitivity x size x 4^-bits x lognormal noise, with
sensitivities spread over four decades) and, with ``--table``, from real sensitivity tables
(each with the bundled model it was measured on, for the cost model), each at 9 budgets from
15% to 85% of the way from the least to the largest plan. The reward is the table's (see
:mod:`mpq.solvers.sac`), so an episode costs microseconds of numpy per step, not a model
evaluation. Then reports the gap of the trained policy (and of the water level alone, action 0)
to the ILP optimum on held-out synthetic tables.

    nice -n 10 python experiments/bench/train_sac_policy.py --timesteps 30000 \
        --table smollm2-135m=TABLE.json [--out mpq/solvers/policies/sac_policy_v1.safetensors]

Run with one torch thread (``MPQ_THREADS=1``; the VM is shared).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from mpq.solvers.base import AllocationProblem
from mpq.solvers.ilp import solve_ilp
from mpq.solvers.sac import PRETRAINED, level_plan, policy_plan, save_policy, train_sac

BITS = np.array([2, 3, 4, 5, 6, 8], float)


def synthetic(seed: int) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 251))
    m = int(rng.integers(4, 7))
    bits = np.sort(rng.choice(BITS, size=m, replace=False))
    size = np.exp(rng.normal(11.0, 1.2, n)).round()
    costs = {"bits": np.round(size[:, None] * (bits[None, :] + 0.25))}
    sens = 10.0 ** rng.uniform(-2, 2, n)
    dist = sens[:, None] * size[:, None] * 4.0 ** -bits[None, :]
    dist *= np.exp(rng.normal(0, 0.3, (n, m)))
    return AllocationProblem(tuple(f"d{i}" for i in range(n)), tuple(f"{b:g}" for b in bits),
                             dist, costs, {"bits": _budget(costs["bits"], 0.5)})


def _budget(c: np.ndarray, frac: float) -> float:
    lo, hi = c.min(1).sum(), c.max(1).sum()
    return float(lo + frac * (hi - lo))


def with_budget(p: AllocationProblem, frac: float) -> AllocationProblem:
    return AllocationProblem(p.decisions, p.options, p.distortion, p.costs,
                             {"bits": _budget(p.costs["bits"], frac)}, p.meta)


def table_problem(model_id: str, path: str, bits: float | None = None) -> AllocationProblem:
    """The problem of a real table (its formats, the model's cost model): at ``bits``
    effective bits, else halfway between the least and the largest plan."""
    from mpq.formats import QuantFormat
    from mpq.pipeline import prepare
    from mpq.problem import build_problem
    from mpq.sensitivity.table import SensitivityTable

    table = SensitivityTable.load(Path(path))
    prep = prepare(model_id)
    specs = next(iter(table.distortions.values()))
    formats = sorted((QuantFormat.parse(s) for s in specs), key=lambda f: f.bits)
    if bits is not None:
        return build_problem(prep.cost, formats, {"bits": bits}, table)
    return with_budget(build_problem(prep.cost, formats, {"bits": 16.0}, table), 0.5)


FRACS = np.linspace(0.15, 0.85, 9)


class BestOnValidation:
    """Every ``every`` steps, the deterministic policy's mean gap to the ILP on held-out
    problems; the weights with the least are kept (the zero-initialized policy, i.e. the
    water level alone, is the first candidate) and loaded back at the end."""

    def __init__(self, problems: list[AllocationProblem], every: int) -> None:
        from stable_baselines3.common.callbacks import BaseCallback

        self.problems = problems
        self.optima = [solve_ilp(p).objective for p in problems]
        self.every = every
        self.best = float("inf")
        self.best_state: dict | None = None
        self.best_step = -1
        self.history: list[tuple[int, float]] = []
        outer = self

        class _Cb(BaseCallback):
            def _on_training_start(self) -> None:
                outer.check(self.model, 0)

            def _on_step(self) -> bool:
                if self.num_timesteps % outer.every < self.training_env.num_envs:
                    outer.check(self.model, self.num_timesteps)
                return True

        self.callback = _Cb()

    def gap(self, model: object) -> float:
        gaps = [p.distortion_of(policy_plan(model, p)[0]) / opt - 1
                for p, opt in zip(self.problems, self.optima, strict=True)]
        return float(np.mean(gaps))

    def check(self, model: object, step: int) -> None:
        import copy

        g = self.gap(model)
        self.history.append((step, g))
        if g < self.best:
            self.best, self.best_step = g, step
            self.best_state = copy.deepcopy(model.policy.state_dict())  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timesteps", type=int, default=30000)
    ap.add_argument("--problems", type=int, default=24, help="synthetic training tables")
    ap.add_argument("--table", action="append", default=[], help="MODEL=TABLE.json")
    ap.add_argument("--envs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=2000, help="validation every N steps")
    ap.add_argument("--out", default=str(PRETRAINED))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ent-coef", default="auto_0.01", help="SAC's entropy coefficient")
    ap.add_argument("--target-entropy", type=float, default=-2.0)
    args = ap.parse_args()
    train = [synthetic(1000 + i) for i in range(args.problems)]
    for spec in args.table:
        model_id, path = spec.split("=", 1)
        train.append(table_problem(model_id, path))
    pool = [(p, [{"bits": _budget(p.costs["bits"], f)} for f in FRACS]) for p in train]
    valid = [with_budget(synthetic(3000 + i), f) for i in range(8) for f in (0.3, 0.7)]
    valid += [with_budget(p, f) for p in train[args.problems:] for f in (0.3, 0.5, 0.7)]
    best = BestOnValidation(valid, args.every)
    first, first_budgets = pool[0]
    t = time.perf_counter()
    model = train_sac(first, total_timesteps=args.timesteps, seed=args.seed,
                      budgets=first_budgets, others=pool[1:], n_envs=args.envs,
                      callbacks=[best.callback], learning_rate=args.lr,
                      ent_coef=args.ent_coef, target_entropy=args.target_entropy)
    best.check(model, args.timesteps)
    minutes = (time.perf_counter() - t) / 60
    assert best.best_state is not None
    model.policy.load_state_dict(best.best_state)
    save_policy(model, Path(args.out), {
        "name": "sac_policy_v1",
        "timesteps": str(args.timesteps),
        "kept_step": str(best.best_step),
        "trained_on": f"{args.problems} synthetic tables + {','.join(args.table) or 'none'}",
        "train_minutes": f"{minutes:.1f}",
        "sac": f"lr={args.lr} ent_coef={args.ent_coef} target_entropy={args.target_entropy} "
               f"envs={args.envs} seed={args.seed}",
    })
    print(f"trained {args.timesteps} steps on {len(train)} tables x {len(FRACS)} budgets in "
          f"{minutes:.1f} min ({os.cpu_count()} CPUs, torch threads "
          f"{os.environ.get('MPQ_THREADS', 'default')}); kept the weights of step "
          f"{best.best_step} (validation mean gap {best.best:.4%}); wrote {args.out}")
    print("validation mean gap by step: " + ", ".join(f"{s}: {g:.4%}" for s, g in best.history))
    gaps, base = [], []
    for i in range(20):
        for frac in (0.25, 0.5, 0.75):
            p = with_budget(synthetic(5000 + i), frac)
            opt = solve_ilp(p).objective
            choice, _ = policy_plan(model, p)
            gaps.append(p.distortion_of(choice) / opt - 1)
            base.append(p.distortion_of(level_plan(p)) / opt - 1)
    print(f"held-out synthetic (20 tables x 3 budgets): policy gap to ILP max {max(gaps):.3%} "
          f"median {np.median(gaps):.3%} mean {np.mean(gaps):.3%}; water level alone max "
          f"{max(base):.3%} median {np.median(base):.3%} mean {np.mean(base):.3%}")


if __name__ == "__main__":
    main()
