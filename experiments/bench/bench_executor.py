"""Benchmark the reference executor on SmolLM2-135M: bytes and prefill speed, side by side.

For fp32 and uniform plans (packed, reference backend, and fake-quant), in one run on one
machine: resident bytes of the model's state dict (must equal the plan's predicted bytes) and
prefill tokens/s on 1 x 128 tokens (median of 5 after a warm-up), as ratios to fp32.
Writes a Markdown table to stdout; paste it into BENCHMARKS.md with the machine and the date.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from mpq.cost import tensor_bits, unique_tensors
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.pipeline import prepare
from mpq.plan import uniform_plan


def _prefill(model: torch.nn.Module, ids: torch.Tensor, reps: int = 5) -> float:
    with torch.no_grad():
        model(ids)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return ids.numel() / statistics.median(times)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    prep = prepare("smollm2-135m")
    model = prep.loaded.model
    ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    fp_bytes = sum(tensor_bits(t) for t in unique_tensors(model.state_dict()).values()) // 8
    fp_tps = _prefill(model, ids)
    rows.append(("fp32", "-", fp_bytes, fp_bytes, fp_tps))
    for spec in ("8:asym", "4:asym", "4:g128:asym"):
        plan = uniform_plan(prep.targets, QuantFormat.parse(spec), "smollm2-135m")
        predicted = prep.cost.plan_cost(plan).total_bytes
        for mode in ("packed", "fake"):
            q = apply_plan(model, plan, prep.targets, mode=mode)  # type: ignore[arg-type]
            resident = sum(tensor_bits(t) for t in unique_tensors(q.state_dict()).values()) // 8
            rows.append((f"uniform:{spec}", mode, predicted, resident, _prefill(q, ids)))
            del q
    print(
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        "| plan | mode | predicted bytes | resident bytes | bytes vs fp32 | prefill tok/s "
        "| speed vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, mode, pred, res, tps in rows:
        print(
            f"| {name} | {mode} | {pred:,} | {res:,} | {res / fp_bytes:.3f} | {tps:.0f} "
            f"| {tps / fp_tps:.2f} |"
        )


if __name__ == "__main__":
    main()
