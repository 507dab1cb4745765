"""Bias correction of quantized Linear layers: does removing the mean output shift pay its bits?

A quantized layer's output error has a constant part ``dW mu`` (``mu``: the mean of the layer's
input; BENCHMARKS "Quantizers" found it 20-80 % of rtn's output error). A per-row bias
``b = -dW mu`` removes it on the calibration inputs, at 16 bits per output row (+0.023 bit per
decoder weight of SmolLM2). Two variants on the main job's plans:

- ``fp mu``: ``mu`` from the fp model on the [statistics] windows (a property of each matrix);
- ``empirical``: ``b = W mu - Wq mu_q`` with ``mu_q`` from the quantized, corrected model,
  iterated (it also corrects the drift every earlier layer leaves in the input).

Scored on held-out wiki and bbc (16 x 512 tokens, ratio to fp32 ppl, KL ± 1.96 se).

    MPQ_THREADS=2 PYTHONPATH=. python experiments/bench/bench_bias.py [plan.json ...]
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

from mpq.compare import _stats_task
from mpq.config import load_config
from mpq.evaluate import evaluate
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.pipeline import Evaluator, uniform_plans
from mpq.plan import BitPlan
from mpq.planstats import plan_stats, with_record
from mpq.prepared import prepare
from mpq.tasks import Task

UNIFORM = ("3:g32:dq:mse", "4:g32:nl:dq:mse")


def input_means(model: nn.Module, names: list[str], task: Task) -> dict[str, torch.Tensor]:
    """Each named Linear layer's mean input over every token of ``task``."""
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def f(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums[name] + x.sum(0) if name in sums else x.sum(0)
            count[name] = count.get(name, 0) + x.shape[0]

        return f

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in task.batches:
                task.head(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / count[n]).float() for n in names}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    cfg = load_config("experiments/configs/smollm2.toml")
    prep = prepare(cfg.model, cfg.include, cfg.exclude, cfg.ties)
    model = prep.loaded.model
    stats_task = _stats_task(cfg, prep.loaded)
    assert stats_task is not None
    names = [t.name for t in prep.targets]
    mu = input_means(model, names, stats_task)
    evals = {
        d: Evaluator(prep, cfg.evaluation.spec(d).task(prep.loaded), progress=False)
        for d in cfg.evaluation.data
    }
    fp = {d: ev(None)[0]["ppl"] for d, ev in evals.items()}  # off the reference logits

    def cells(m: nn.Module) -> str:
        out = []
        for d, ev in evals.items():
            r = evaluate(ev.task, m, ev.reference())
            out.append(f"{r['ppl'] / fp[d]:.4f} KL {r['kl']:.4f} ± {1.96 * r['kl_se']:.4f}")
        return " | ".join(out)

    plans = {
        next(iter(p.formats.values())).spec(): with_record(p, stats_task)
        for p in uniform_plans(prep, [QuantFormat.parse(s) for s in UNIFORM])
    }
    plans.update({f: BitPlan.load(f) for f in sys.argv[1:]})
    w = {n: model.get_submodule(n).weight.detach().float() for n in names}
    for label, plan in plans.items():
        st = plan_stats(prep.loaded, prep.targets, plan)
        mq = apply_plan(copy.deepcopy(model), plan, prep.targets, mode="fake", stats=st)
        print(label, "plain:", cells(mq), flush=True)
        wq = {n: mq.get_submodule(n).weight.detach().float() for n in names}
        with torch.no_grad():
            for n in names:
                lin = mq.get_submodule(n)
                b = -((wq[n] - w[n]) @ mu[n])
                lin.bias = nn.Parameter(b.to(lin.weight.dtype), requires_grad=False)
        print(label, "fp mu:", cells(mq), flush=True)
        for it in range(3):
            mu_q = input_means(mq, names, stats_task)
            with torch.no_grad():
                for n in names:
                    mq.get_submodule(n).bias.copy_(w[n] @ mu[n] - wq[n] @ mu_q[n])
            print(label, f"empirical, iteration {it + 1}:", cells(mq), flush=True)


if __name__ == "__main__":
    main()
