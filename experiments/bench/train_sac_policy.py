"""Train the policy of mpq's SAC agent (``mpq/solvers/policies/sac_policy_v2.safetensors``).

The actor is first taught by the exact ILP (DAgger, :mod:`mpq.solvers._sac_imitate`: each
state labelled by the ILP optimum of the decisions left), then, with ``--sac-steps``, trained
further by SAC (stable-baselines3) on the table's shaped reward. Each stage's weights are
checked on held-out problems and the best is kept (the water level alone, action 0, is the
first candidate: a stage that does not beat it is not shipped). The answer scored is
``solve_sac``'s: the better of the actor's plan and the water level's, plain or rounded.
``--rounding`` trains in episodes whose water level rounds the lump first (recorded in the
file's header; the shipped v2 was trained without).

Episodes come from synthetic tables (40..250 decisions, 4..6 bit-width options, stored bits as
the budget; distortion = sensitivity x size x 4^-bits x lognormal noise, sensitivities over
four decades), "lumpy" synthetic tables (the same with 1..3 decisions 8-60x larger, one of them
last half the time, as a classifier or LM head is), the conformance suite's small problems
(6 decisions, one or three resources, other seeds than the suite's) and, with ``--table``,
real sensitivity tables (with the bundled model they were measured on, for the cost model),
each large table at 5 budgets from 15% to 85% of the way from the least to the largest plan.
Validation: other seeds of the same generators. MobileNetV2 (and any table not named) is never
seen.

    nice -n 10 python experiments/bench/train_sac_policy.py \
        --table smollm2-135m=experiments/results/sac-tables/smollm2_fisher.json

Run with one torch thread (``MPQ_THREADS=1``; the VM is shared).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mpq.solvers._sac_imitate import Labelled, collect, fit_actor
from mpq.solvers.base import AllocationProblem
from mpq.solvers.ilp import solve_ilp
from mpq.solvers.sac import (
    PRETRAINED,
    AllocationEpisode,
    NumpyActor,
    level_plan,
    policy_plan,
    save_weights,
    train_sac,
)
from mpq.testing import random_problem

BITS = np.array([2, 3, 4, 5, 6, 8], float)


def synthetic(seed: int, lumpy: bool = False) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 251))
    m = int(rng.integers(4, 7))
    bits = np.sort(rng.choice(BITS, size=m, replace=False))
    size = np.exp(rng.normal(11.0, 1.2, n)).round()
    if lumpy:
        k = int(rng.integers(1, 4))
        where = rng.choice(n, size=k, replace=False)
        if rng.uniform() < 0.5:
            where[0] = n - 1
        size[where] *= rng.uniform(8, 60, k)
        size = size.round()
    costs = {"bits": np.round(size[:, None] * (bits[None, :] + 0.25))}
    sens = 10.0 ** rng.uniform(-2, 2, n)
    dist = sens[:, None] * size[:, None] * 4.0 ** -bits[None, :]
    dist *= np.exp(rng.normal(0, 0.3, (n, m)))
    return AllocationProblem(
        tuple(f"d{i}" for i in range(n)),
        tuple(f"{b:g}" for b in bits),
        dist,
        costs,
        {"bits": _budget(costs["bits"], 0.5)},
    )


def small(seed: int) -> AllocationProblem:
    """A conformance-suite problem (6 decisions x 4 options, 15% disallowed), one or three
    resources."""
    return random_problem(seed, resources=1 + 2 * (seed % 2), disallow=0.15)


def _budget(c: np.ndarray, frac: float) -> float:
    lo, hi = c.min(1).sum(), c.max(1).sum()
    return float(lo + frac * (hi - lo))


def with_budget(p: AllocationProblem, frac: float) -> AllocationProblem:
    return AllocationProblem(
        p.decisions,
        p.options,
        p.distortion,
        p.costs,
        {"bits": _budget(p.costs["bits"], frac)},
        p.meta,
    )


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


FRACS = np.linspace(0.15, 0.85, 5)
# The model's own per-decision features (kind, rows, cols, weight std, kurtosis): the tables
# trained on carry none, so the actor is made blind to them (a model that has them would
# otherwise show it inputs it never saw).
MODEL_COLUMNS = (1, 2, 3, 7, 8)


def ilp_choice(p: AllocationProblem) -> np.ndarray:
    return np.asarray(solve_ilp(p).choice, dtype=np.int64)


class Validation:
    """Mean gap to the ILP on held-out problems, per group, of the actor's own plans and of the
    solver's answer (the better of the actor's plan and the water level's, as
    :func:`mpq.solvers.sac.solve_sac` returns); the score is the mean of the group means of
    the answer (so 6-decision problems, whose gaps are largest, do not outweigh the rest), and
    the weights with the least score are kept."""

    def __init__(self, groups: dict[str, Sequence[AllocationProblem]], rounding: bool) -> None:
        self.groups = {k: list(v) for k, v in groups.items()}
        self.rounding = rounding
        self.optima = {k: [solve_ilp(p).objective for p in v] for k, v in self.groups.items()}
        # solve_sac's starts: the water level, plain and with the lump rounded
        self.levels = {
            k: [
                min(p.distortion_of(level_plan(p)), p.distortion_of(level_plan(p, rounding=True)))
                for p in v
            ]
            for k, v in self.groups.items()
        }
        self.best = float("inf")
        self.best_weights: dict[str, np.ndarray] | None = None
        self.best_stage = ""
        self.history: list[tuple[str, float]] = []
        self.meta = {"rounding": "1" if rounding else "0"}

    def check(self, stage: str, weights: dict[str, np.ndarray] | None) -> float:
        """``weights`` None: the water level (action 0)."""
        actor = None if weights is None else NumpyActor(weights, self.meta)
        alone, answer = {}, {}
        for k, problems in self.groups.items():
            own, best = [], []
            for p, opt, lv in zip(problems, self.optima[k], self.levels[k], strict=True):
                v = lv if actor is None else p.distortion_of(policy_plan(actor, p)[0])
                own.append(v / opt - 1)
                best.append(min(v, lv) / opt - 1)
            alone[k], answer[k] = float(np.mean(own)), float(np.mean(best))
        g = float(np.mean(list(answer.values())))
        self.history.append((stage, g))
        print(
            f"  validation {stage}: score {g:.4%}; answer "
            + ", ".join(f"{k} {v:.4%}" for k, v in answer.items())
            + "; actor alone "
            + ", ".join(f"{k} {v:.4%}" for k, v in alone.items()),
            flush=True,
        )
        if g < self.best:
            self.best, self.best_weights, self.best_stage = g, weights, stage
        return g


def sac_stage(
    weights: dict[str, np.ndarray],
    pool: list,
    steps: int,
    valid: Validation,
    every: int,
    args: argparse.Namespace,
) -> None:
    """SAC from the imitation weights on the table's shaped reward; every ``every`` steps
    the actor is checked on the validation problems."""
    from stable_baselines3.common.callbacks import BaseCallback

    def actor_weights(model: object) -> dict[str, np.ndarray]:
        state = model.policy.state_dict()  # type: ignore[attr-defined]
        return {
            k: v.detach().cpu().numpy().copy()
            for k, v in state.items()
            if k.startswith("actor.latent_pi.") or k.startswith("actor.mu.")
        }

    class Every(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % every < self.training_env.num_envs:
                valid.check(f"sac step {self.num_timesteps}", actor_weights(self.model))
            return True

    first, budgets = pool[0]
    model = train_sac(
        first,
        total_timesteps=steps,
        seed=args.seed,
        budgets=budgets,
        others=pool[1:],
        n_envs=args.envs,
        init=NumpyActor(weights, valid.meta),
        callbacks=[Every()],
        learning_rate=args.lr,
        ent_coef=args.ent_coef,
        target_entropy=args.target_entropy,
        learning_starts=args.learning_starts,
    )
    valid.check(f"sac step {steps}", actor_weights(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=24, help="synthetic training tables")
    ap.add_argument("--lumpy", type=int, default=12, help="lumpy synthetic training tables")
    ap.add_argument("--small", type=int, default=60, help="6-decision training problems")
    ap.add_argument("--table", action="append", default=[], help="MODEL=TABLE.json")
    ap.add_argument("--rounds", type=int, default=4, help="DAgger rounds (0: expert states)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument(
        "--share",
        type=float,
        default=0.4,
        help="share of the episodes rolled out by the actor in each later round",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sac-steps", type=int, default=0, help="SAC steps after imitation")
    ap.add_argument("--every", type=int, default=2000, help="SAC validation every N steps")
    ap.add_argument("--envs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ent-coef", default="auto_0.01", help="SAC's entropy coefficient")
    ap.add_argument("--target-entropy", type=float, default=-2.0)
    ap.add_argument("--learning-starts", type=int, default=1000)
    ap.add_argument(
        "--rounding",
        action="store_true",
        help="episodes with the lump rounded (policy v3; v2 was trained without)",
    )
    ap.add_argument("--out", default=str(PRETRAINED))
    ap.add_argument("--data", default="", help="save the labelled states here (.npz)")
    ap.add_argument("--from-data", default="", help="fit on these saved states (no rollouts)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    big = [synthetic(1000 + i) for i in range(args.problems)]
    big += [synthetic(2000 + i, lumpy=True) for i in range(args.lumpy)]
    for spec in args.table:
        model_id, path = spec.split("=", 1)
        big.append(table_problem(model_id, path))
    pool = [(p, [{"bits": _budget(p.costs["bits"], f)} for f in FRACS]) for p in big]
    pool += [(q, [dict(q.limits)]) for q in (small(10_000 + i) for i in range(args.small))]
    valid = Validation(
        {
            "synthetic": [
                with_budget(synthetic(3000 + i), f) for i in range(8) for f in (0.3, 0.7)
            ],
            "lumpy": [
                with_budget(synthetic(4000 + i, True), f) for i in range(8) for f in (0.3, 0.7)
            ],
            "small": [small(20_000 + i) for i in range(40)],
        },
        args.rounding,
    )
    episodes = [(AllocationEpisode(p, rounding=args.rounding), b) for p, bs in pool for b in bs]
    print(
        f"{len(pool)} training problems, {len(episodes)} (problem, budget) episodes; "
        f"{sum(map(len, valid.groups.values()))} validation problems",
        flush=True,
    )
    valid.check("water level", None)
    parts: list[Labelled] = []
    weights: dict[str, np.ndarray] | None = None
    if args.from_data:
        saved = np.load(args.from_data)
        parts.append(Labelled(saved["obs"], saved["lo"], saved["hi"]))
        weights = fit_actor(parts[0], epochs=args.epochs, seed=args.seed, ignore=MODEL_COLUMNS)
        print(f"fitted on {len(parts[0].obs)} saved states", flush=True)
        valid.check("fit on saved states", weights)
    for r in range(args.rounds if not args.from_data else 0):
        t = time.perf_counter()
        policy = None if weights is None else NumpyActor(weights, valid.meta)
        solves = 0
        rng = np.random.default_rng(args.seed + r)
        chosen = episodes if r == 0 else [e for e in episodes if rng.uniform() < args.share]
        for ep, limits in chosen:
            lab, k = collect(ep, limits, policy, ilp_choice)
            parts.append(lab)
            solves += k
        data = Labelled.join(parts)
        if args.data:
            np.savez(args.data, obs=data.obs, lo=data.lo, hi=data.hi)
        moved = float(np.mean((data.lo > 0) | (data.hi < 0)))
        weights = fit_actor(data, epochs=args.epochs, seed=args.seed, ignore=MODEL_COLUMNS)
        print(
            f"DAgger round {r}: {len(data.obs)} states ({moved:.1%} off the water level), "
            f"{solves} ILP solves, {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        valid.check(f"dagger round {r}", weights)
    if args.sac_steps and weights is not None:
        sac_stage(valid.best_weights or weights, pool, args.sac_steps, valid, args.every, args)
    minutes = (time.perf_counter() - t0) / 60
    kept = valid.best_weights
    if kept is None:
        print("no stage beat the water level; nothing written")
        return
    save_weights(
        kept,
        Path(args.out),
        {
            "name": Path(args.out).stem,
            "trained_by": "DAgger on ILP labels"
            + (f" + SAC {args.sac_steps} steps" if args.sac_steps else ""),
            "rounds": str(args.rounds),
            "kept_stage": valid.best_stage,
            "validation_gap": f"{valid.best:.6f}",
            "trained_on": f"{args.problems} synthetic + {args.lumpy} lumpy synthetic + "
            f"{args.small} small tables + {','.join(args.table) or 'no real table'}",
            "train_minutes": f"{minutes:.1f}",
            "seed": str(args.seed),
            **valid.meta,
        },
    )
    print(
        f"kept {valid.best_stage} (validation mean gap {valid.best:.4%}); {minutes:.1f} min "
        f"({os.cpu_count()} CPUs, torch threads {os.environ.get('MPQ_THREADS', 'default')}); "
        f"wrote {args.out}"
    )
    actor = NumpyActor(kept, valid.meta)
    for name, make in (
        ("synthetic", lambda i: synthetic(5000 + i)),
        ("lumpy", lambda i: synthetic(6000 + i, lumpy=True)),
    ):
        gaps, base = [], []
        for i in range(20):
            for frac in (0.25, 0.5, 0.75):
                p = with_budget(make(i), frac)
                opt = solve_ilp(p).objective
                gaps.append(p.distortion_of(policy_plan(actor, p)[0]) / opt - 1)
                base.append(
                    min(
                        p.distortion_of(level_plan(p)),
                        p.distortion_of(level_plan(p, rounding=True)),
                    )
                    / opt
                    - 1
                )
        print(
            f"held-out {name} (20 tables x 3 budgets): policy gap to ILP max {max(gaps):.3%} "
            f"median {np.median(gaps):.3%} mean {np.mean(gaps):.3%}; water level alone max "
            f"{max(base):.3%} median {np.median(base):.3%} mean {np.mean(base):.3%}; "
            f"policy worse on {sum(g > b + 1e-12 for g, b in zip(gaps, base, strict=True))}"
            f" / {len(gaps)}"
        )


if __name__ == "__main__":
    main()
