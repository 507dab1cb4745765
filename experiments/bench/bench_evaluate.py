"""Held-out evaluation on SmolLM2-135M: reference statistics kept on the Reference against the
previous path (two float64 ``log_softmax`` per unit on every call), side by side in one run.

One reference on wiki held-out (``N`` windows x 512 tokens, batch 1); four uniform plans are
evaluated against it. Per batch the quantized model's logits are computed once and both
statistics paths run on the same logits, so the forward pass is shared and timed on its own.
Prints CPU seconds per plan (process time: the machine is shared) of the forward pass, of each
statistics path, of a whole ``evaluate`` under each, the one-off cost of the reference's
``logsumexp``, and the largest relative difference of the per-window KL and NLL. Usage:

    MPQ_THREADS=1 PYTHONPATH=. python experiments/bench/bench_evaluate.py [N]
"""

from __future__ import annotations

import os
import sys
import time

import torch

from mpq.evaluate import batch_stats, reference
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.pipeline import prepare, task_for
from mpq.plan import uniform_plan

PLANS = ("8:asym", "6:asym", "4:asym", "3:asym")


def two_log_softmax(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous ``batch_stats``: per-unit KL and NLL from two float64 log_softmax."""
    kls, nlls = [], []
    for u in range(logits.shape[0]):
        logp = torch.log_softmax(logits[u].double(), dim=-1)
        ref_logprobs = torch.log_softmax(ref_logits[u].double(), dim=-1)
        p_ref = ref_logprobs.exp()
        kls.append(torch.where(p_ref > 0, p_ref * (ref_logprobs - logp), 0.0).sum(-1).mean(-1))
        logp.argmax(-1) == ref_logprobs.argmax(-1)  # noqa: B015 (the old path's agreement work)
        nlls.append(-logp.gather(-1, labels[u][..., None]).squeeze(-1).mean(-1))
    return torch.stack(kls), torch.stack(nlls)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "1")))
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    prep = prepare("smollm2-135m")
    task = task_for(prep, "wiki", "heldout", n, 512, 1)
    assert task.labels is not None
    ref = reference(task, prep.loaded.model)
    c0 = time.process_time()
    for i in range(len(task.batches)):
        ref.batch(i)
    once = time.process_time() - c0
    rows = []
    worst = 0.0
    for spec in PLANS:
        plan = uniform_plan(prep.targets, QuantFormat.parse(spec), "smollm2-135m")
        model = apply_plan(prep.loaded.model, plan, prep.targets, mode="fake")
        fwd = old = new = 0.0
        with torch.no_grad():
            for i, batch in enumerate(task.batches):
                c0 = time.process_time()
                logits = task.head(model, batch)
                c1 = time.process_time()
                kl_old, nll_old = two_log_softmax(logits, ref.logits[i], task.labels[i])
                c2 = time.process_time()
                s = batch_stats(logits, ref.batch(i), task.labels[i])
                c3 = time.process_time()
                fwd, old, new = fwd + c1 - c0, old + c2 - c1, new + c3 - c2
                assert s.nll is not None
                for a, b in ((s.kl, kl_old), (s.nll, nll_old)):
                    worst = max(worst, float(((a - b).abs() / b.abs()).max()))
        rows.append((spec, fwd, old, new))
    print(f"wiki heldout {n} x 512, batch 1, {torch.get_num_threads()} thread(s); CPU s per plan")
    print(
        "| plan | forward | stats, two log_softmax | stats, kept reference | evaluate before | "
        "evaluate after | speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec, fwd, old, new in rows:
        print(
            f"| {spec} | {fwd:.2f} | {old:.2f} | {new:.2f} | {fwd + old:.2f} | {fwd + new:.2f} "
            f"| {(fwd + old) / (fwd + new):.2f}x |"
        )
    print(
        f"reference logsumexp, once per reference: {once:.2f} s; largest relative difference "
        f"of per-window KL and NLL: {worst:.1e}"
    )


if __name__ == "__main__":
    main()
