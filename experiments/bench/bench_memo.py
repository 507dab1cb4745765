"""What the quantization memo saves a search: plans that differ in one layer, applied and
measured one after another on SmolLM2-135M (the main job's palette and importance), with
`apply_plan(memo=...)` and without, side by side in one run.

Each plan: the ILP-like mix (every target at `4:g32:nl:dq:mse`, except one moving target at
`3:g32:dq:mse`), applied in fake mode and scored on 2 x 256 wiki+bbc calibration tokens. The
first plan fills the memo (it costs what a plan without memo costs); the rest reuse it.

    MPQ_THREADS=2 PYTHONPATH=. python experiments/bench/bench_memo.py [--plans 5]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mpq.evaluate import evaluate, reference
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.pipeline import prepare, task_for
from mpq.plan import BitPlan
from mpq.planstats import plan_stats, with_record

BASE, MOVE = QuantFormat.parse("4:g32:nl:dq:mse"), QuantFormat.parse("3:g32:dq:mse")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    prep = prepare("smollm2-135m")
    model, targets = prep.loaded.model, prep.targets
    stats_task = task_for(prep, "wiki+bbc", "calib", 16, 512, 2)
    calib = task_for(prep, "wiki+bbc", "calib", 2, 256, 2)
    ref = reference(calib, model)
    names = [t.name for t in targets]
    plans = [
        with_record(BitPlan({n: MOVE if j == 7 * i + 6 else BASE for j, n in enumerate(names)},
                            prep.loaded.model_id), stats_task)
        for i in range(args.plans)
    ]  # fmt: skip
    stats = plan_stats(prep.loaded, targets, plans[0])
    rows = []
    for label, memo in (("without memo", None), ("with memo", {})):
        for i, plan in enumerate(plans):
            t0 = time.perf_counter()
            q = apply_plan(model, plan, targets, mode="fake", stats=stats, memo=memo)
            t1 = time.perf_counter()
            kl = evaluate(calib, q, ref).metrics["kl"]
            t2 = time.perf_counter()
            rows.append((label, i, t1 - t0, t2 - t1, kl))
            print(f"| {label} | {i} | {t1 - t0:.2f} | {t2 - t1:.2f} | {kl:.6f} |", flush=True)
    by = {lab: [r for r in rows if r[0] == lab] for lab in ("without memo", "with memo")}
    later = [sum(r[2] + r[3] for r in by[lab][1:]) / max(1, len(by[lab]) - 1) for lab in by]
    same = all(a[4] == b[4] for a, b in zip(by["without memo"], by["with memo"], strict=True))
    print(
        f"\nper plan after the first: {later[0]:.2f} s without, {later[1]:.2f} s with the memo "
        f"({later[0] / later[1]:.1f}x); KLs identical: {same}"
    )


if __name__ == "__main__":
    main()
