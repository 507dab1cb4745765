"""The anchored measured table against the fully measured one on SmolLM2-135M, side by side.

Every 15th target (14 of the 210, spread over the depth), the quality palette of
``experiments/configs/smollm2_quality.toml``, the same calibration windows (wiki calib,
``--n`` x ``--seq-len`` tokens) and statistics windows (wiki calib 16 x 512) for both tables.
Prints, per format, the geometric mean and spread of anchored / measured and the rank
correlation over layers, and the CPU seconds of each table. Usage:

    MPQ_THREADS=1 PYTHONPATH=. python experiments/bench/bench_anchor.py [--n 4 --seq-len 256]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from mpq.formats import QuantFormat
from mpq.pipeline import prepare, task_for
from mpq.sensitivity.measured import Measured
from mpq.sensitivity.runner import run_estimator

FORMATS = "3:g32:dq:mse,4:g32:nl:dq:mse,4:g32:asym:dq:mse,5:g32:dq:mse,6:g32:dq:mse,8:g32:dq"
ANCHOR = "4:g32:nl:dq:mse"


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "1")))
    prep = prepare("smollm2-135m")
    task = task_for(prep, "wiki", "calib", args.n, args.seq_len, 2)
    stats = task_for(prep, "wiki", "calib", 16, 512, 2)
    formats = [QuantFormat.parse(s) for s in FORMATS.split(",")]
    targets = prep.targets[::15]
    tables, cpu = {}, {}
    for label, est in (("measured", Measured()), ("anchored", Measured(anchor=ANCHOR))):
        c0 = time.process_time()
        tables[label] = run_estimator(
            est, prep.loaded.model, targets, task, model_id="bench", formats=formats,
            progress=True, stats_task=stats,
        )  # fmt: skip
        cpu[label] = time.process_time() - c0
    print(f"{len(targets)} targets, calibration {args.n} x {args.seq_len} tokens")
    print(f"CPU s: measured {cpu['measured']:.0f}, anchored {cpu['anchored']:.0f}")
    print("| format | anchored / measured: geo. mean | min | max | Spearman over layers |")
    print("|---|---|---|---|---|")
    for f in formats:
        s = f.spec()
        m = [tables["measured"].distortions[t.name][s] for t in targets]
        a = [tables["anchored"].distortions[t.name][s] for t in targets]
        r = [x / y for x, y in zip(a, m, strict=True) if y > 0]
        geo = math.exp(sum(math.log(x) for x in r) / len(r)) if r else float("nan")
        lo, hi = (min(r), max(r)) if r else (float("nan"), float("nan"))
        print(f"| `{s}` | {geo:.3f} | {lo:.3f} | {hi:.3f} | {spearman(a, m):.3f} |")


if __name__ == "__main__":
    main()
