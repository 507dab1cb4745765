"""Benchmark the packed executor's backends: SmolLM2-135M on CPU, the Triton GEMV on a GPU.

CPU part (always): SmolLM2-135M under fp32 and three plans (uniform ``8``, uniform ``4:g64``
and a mixed plan), each on the ``reference`` and ``cpu`` backends, in one run on one machine:

- resident bytes: the unique parameters and persistent buffers of the model (asserted equal to
  the plan's predicted bytes), plus the backend-only runtime buffers (the CPU int4 op's
  repacked codes) in a separate column;
- prefill: tokens/s on one forward of 1 x 128 tokens (median of ``--reps``);
- decode: tokens/s of batch-1 single-token steps with the KV cache: a 32-token prompt is
  prefilled, then ``--decode`` tokens are fed one at a time with ``past_key_values`` (teacher
  forced from a fixed sequence, so every backend does the same work).
Every configuration is built first; then ``--reps`` rounds (after a warm-up round) time each
configuration in turn, and the median per configuration is reported, so that load changes on a
shared machine hit all of them alike. Ratios are to fp32 in the same run.

GPU part (only with CUDA): the Triton GEMV at batch 1 vs fp16 ``torch.matmul`` on 4096x4096,
11008x4096 and 4096x11008 weights at 2/3/4/8 bits, group 128, and the bandwidth limit
``16 / (b + 16/128)`` x fp16 (4 bits -> 3.88x). Without CUDA it prints "unmeasured (no GPU)".

Run: ``MPQ_CACHE=... python experiments/bench/bench_kernels.py [--reps 3] [--decode 16]``.
Paste the Markdown it prints into BENCHMARKS.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import os
import platform
import statistics
import time

import torch

from mpq.executor import apply_plan, backends, resident_bytes
from mpq.formats import QuantFormat
from mpq.pipeline import prepare
from mpq.plan import BitPlan, uniform_plan

PREFILL = 128
PROMPT = 32
VOCAB = 49152


def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one forward of ``ids`` (no KV cache)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        return time.perf_counter() - t0


def decode_seconds(model: torch.nn.Module, seq: torch.Tensor, n: int) -> float:
    """Seconds of ``n`` batch-1 decode steps after a ``PROMPT``-token prefill (KV cache)."""
    # transformers 5.x renamed past_key_values to cache (input and output); accept both.
    new_api = "cache" in inspect.signature(model.forward).parameters
    key = "cache" if new_api else "past_key_values"
    with torch.no_grad():
        past = getattr(model(seq[:, :PROMPT], use_cache=True), key)
        t0 = time.perf_counter()
        for i in range(n):
            tok = seq[:, PROMPT + i : PROMPT + i + 1]
            past = getattr(model(tok, use_cache=True, **{key: past}), key)
        return time.perf_counter() - t0


def mixed_plan(targets: list, model_id: str) -> BitPlan:
    """Attention and embeddings at 8 bits, gate/up at 4:g64, down_proj at 3:g64:asym (a width
    the CPU ops cannot take: those layers run the reference path on the cpu backend)."""
    fmts = {}
    for t in targets:
        if ".mlp.down_proj" in t.name:
            fmts[t.name] = QuantFormat.parse("3:g64:asym")
        elif ".mlp." in t.name:
            fmts[t.name] = QuantFormat.parse("4:g64")
        else:
            fmts[t.name] = QuantFormat.parse("8")
    return BitPlan(fmts, model_id, solver="manual", meta={"name": "mixed"})


def cpu_part(reps: int, n_decode: int) -> None:
    prep = prepare("smollm2-135m")
    model = prep.loaded.model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, PREFILL), generator=gen)
    seq = torch.randint(0, VOCAB, (1, PROMPT + n_decode), generator=gen)
    fp_state, _ = resident_bytes(model)
    configs: list[tuple[str, str, str, int, int, int, torch.nn.Module]] = [
        ("fp32", "-", "-", fp_state, fp_state, 0, model)
    ]
    plans = [
        ("uniform:8", uniform_plan(prep.targets, QuantFormat.parse("8"), prep.loaded.model_id)),
        (
            "uniform:4:g64",
            uniform_plan(prep.targets, QuantFormat.parse("4:g64"), prep.loaded.model_id),
        ),
        ("mixed", mixed_plan(list(prep.targets), prep.loaded.model_id)),
    ]
    for name, plan in plans:
        predicted = prep.cost.plan_cost(plan).total_bytes
        for backend in ("reference", "cpu"):
            q = apply_plan(model, plan, prep.targets, backend=backend)
            state, runtime = resident_bytes(q)
            assert state == predicted, (name, backend, state, predicted)
            got = list(backends(q).values())
            share = f"{sum(b == backend for b in got)}/{len(got)}"
            configs.append((name, backend, share, predicted, state, runtime, q))
    # Repetitions are interleaved across configurations (round robin), so a change of load on a
    # shared machine hits every configuration alike; one warm-up round first.
    pre: list[list[float]] = [[] for _ in configs]
    dec: list[list[float]] = [[] for _ in configs]
    for r in range(reps + 1):
        for i, c in enumerate(configs):
            tp, td = prefill_seconds(c[-1], ids), decode_seconds(c[-1], seq, n_decode)
            if r:
                pre[i].append(tp)
                dec[i].append(td)
        print(f"  round {r}/{reps} done")
    pre_tps = [PREFILL / statistics.median(p) for p in pre]
    dec_tps = [n_decode / statistics.median(d) for d in dec]
    cpu = _cpu_name()
    print(
        f"\nCPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{dt.date.today().isoformat()}; prefill 1x{PREFILL}, decode {n_decode} steps after a "
        f"{PROMPT}-token prompt; median of {reps} interleaved rounds"
    )
    print(
        "| plan | backend | layers on it | predicted bytes | resident bytes | runtime extra "
        "| bytes vs fp32 | prefill tok/s | prefill vs fp32 | decode tok/s | decode vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (name, backend, share, pred, state, extra, _) in enumerate(configs):
        print(
            f"| {name} | {backend} | {share} | {pred:,} | {state:,} | {extra:,} "
            f"| {(state + extra) / fp_state:.3f} | {pre_tps[i]:.0f} "
            f"| {pre_tps[i] / pre_tps[0]:.2f} | {dec_tps[i]:.1f} | {dec_tps[i] / dec_tps[0]:.2f} |"
        )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_part(reps: int) -> None:
    if not torch.cuda.is_available():
        print("\nGPU: unmeasured (no GPU)")
        return
    from triton.testing import do_bench

    from mpq.kernels import triton_kernels as tk
    from mpq.kernels.modules import PackedWeight

    name = torch.cuda.get_device_name()
    print(f"\nGPU: {name}, torch {torch.__version__}, {dt.date.today().isoformat()}; batch 1")
    print(
        "| weight [N, K] | bits | fp16 matmul us | triton gemv us | speed-up | limit "
        "16/(b+s) | % of limit |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w = torch.randn(n, k, device="cuda") / k**0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        w16 = w.half()
        t16 = do_bench(lambda x=x, w16=w16: torch.matmul(x, w16.T), rep=max(reps, 20)) * 1e3
        for bits in (2, 3, 4, 8):
            p = PackedWeight(w, QuantFormat(bits=bits, group_size=128))
            ops = p.operands()
            tq = do_bench(lambda x=x, ops=ops: tk.gemv(x, ops), rep=max(reps, 20)) * 1e3
            limit = 16 / (bits + 16 / 128)
            print(
                f"| {n}x{k} | {bits} | {t16:.1f} | {tq:.1f} | {t16 / tq:.2f}x | {limit:.2f}x "
                f"| {100 * t16 / tq / limit:.0f}% |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    if not args.skip_cpu:
        cpu_part(args.reps, args.decode)
    gpu_part(args.reps)


if __name__ == "__main__":
    main()
