"""Measured damage on SmolLM2-135M: the cached block path against the plain path, side by side.

Both paths score the same targets (every 15th of the 210, spread over the depth) for the demo's
five formats on the demo's calibration data (wiki calib, 2 x 128 tokens, batch 2), in one run;
prints CPU seconds per (layer, format) of each path (process time: the machine is shared, so
wall time is not comparable between the two runs), their ratio, and the largest relative
difference between the two tables. Usage:

    MPQ_THREADS=1 PYTHONPATH=. python experiments/bench/bench_measured_paths.py
"""

from __future__ import annotations

import os
import time

import torch

from mpq.formats import QuantFormat
from mpq.pipeline import prepare, task_for
from mpq.sensitivity.measured import Measured
from mpq.sensitivity.runner import run_estimator

FORMATS = "3:asym,4:asym,5:asym,6:asym,8:asym"


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "1")))
    prep = prepare("smollm2-135m")
    task = task_for(prep, "wiki", "calib", 2, 128, 2)
    formats = [QuantFormat.parse(s) for s in FORMATS.split(",")]
    targets = prep.targets[::15]
    cpu: dict[str, float] = {}
    tables = {}
    for path in ("auto", "plain"):
        c0 = time.process_time()
        tables[path] = run_estimator(
            Measured(path=path),
            prep.loaded.model,
            targets,
            task,
            model_id="bench",
            formats=formats,
            progress=False,
        )
        cpu[path] = (time.process_time() - c0) / (len(targets) * len(formats))
    worst = 0.0
    for name, row in tables["plain"].distortions.items():
        for spec, value in row.items():
            got = tables["auto"].distortions[name][spec]
            worst = max(worst, abs(got - value) / max(abs(value), 1e-12))
    print(f"{len(targets)} targets x {len(formats)} formats, {torch.get_num_threads()} thread(s)")
    print("| path | CPU s per (layer, format) |")
    print("|---|---|")
    for path in ("plain", "auto"):
        print(f"| {path} | {cpu[path]:.3f} |")
    print(f"speed-up {cpu['plain'] / cpu['auto']:.2f}x; largest relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
