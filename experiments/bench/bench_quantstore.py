"""`mpq solve` at a new budget from the cached table, with the quantized-weight cache on and off.

Runs the README's command (`mpq solve --model smollm2-135m --budget bits=B`, default guard)
as subprocesses, alternating ``$MPQ_QUANT_CACHE_MB=0`` (off: every matrix of the new plan is
quantized again, as before mpq.quantstore) and the default (on: read back from
``$MPQ_CACHE/quant``), each at a budget no earlier run solved (the evaluation cache would
otherwise serve the plan's guard measurement). Both modes do the same work otherwise. Run it
after `make demo` on the same ``$MPQ_CACHE`` (the table and its quantized weights are there).
A warm-up solve (cache on, not counted) first puts the guard's uniform curve in the evaluation
cache, as any earlier solve on the same data does. ``--cold`` instead hides the evaluation
cache during each run (and puts it back after): the first solve after the table, whose guard
also evaluates every uniform plan. Prints a Markdown table of wall times and their ratio. Usage:

    MPQ_THREADS=2 PYTHONPATH=. python experiments/bench/bench_quantstore.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def evals_dir() -> Path:
    from mpq.models import cache_root

    return cache_root() / "evals"


def run(budget: float, on: bool, out: Path, extra: list[str], cold: bool = False) -> float:
    hidden = evals_dir().with_name("evals.bench-hidden")
    if cold and evals_dir().exists():
        evals_dir().rename(hidden)
    try:
        return _run(budget, on, out, extra)
    finally:
        if cold and hidden.exists():
            shutil.rmtree(evals_dir(), ignore_errors=True)
            hidden.rename(evals_dir())


def _run(budget: float, on: bool, out: Path, extra: list[str]) -> float:
    env = dict(os.environ)
    if on:
        env.pop("MPQ_QUANT_CACHE_MB", None)
    else:
        env["MPQ_QUANT_CACHE_MB"] = "0"
    cmd = [sys.executable, "-m", "mpq.cli", "solve", "--model", "smollm2-135m"]
    cmd += ["--budget", f"bits={budget}", "--out", str(out), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    guard = [line for line in done.stdout.splitlines() if line.startswith("guard:")]
    print(f"  bits={budget} cache {'on ' if on else 'off'}: {seconds:.1f} s; {guard[-1][:110]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="4.11,4.13,4.17,4.19", help="new budgets, in pairs")
    ap.add_argument("--extra", default="", help="more `mpq solve` arguments")
    ap.add_argument("--warmup", type=float, default=4.09, help="untimed first budget")
    ap.add_argument("--cold", action="store_true", help="hide the evaluation cache per run")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    if len(budgets) % 2:
        raise SystemExit("--budgets: give an even number (one run off and one on per pair)")
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.cold:
            warm = run(args.warmup, True, Path(tmp) / "w.json", [])
            print(f"warm-up (not counted): {warm:.1f} s")
        for i in range(0, len(budgets), 2):
            order = (False, True) if (i // 2) % 2 == 0 else (True, False)
            for on, budget in zip(order, budgets[i : i + 2], strict=True):
                times[on].append(
                    run(budget, on, Path(tmp) / "plan.json", args.extra.split(), args.cold)
                )
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n{'cold (first solve)' if args.cold else 'warm (a new budget)'}:")
    print("\n| quantized-weight cache | runs (s) | median (s) |")
    print("|---|---|---|")
    for name, key in (("off (`MPQ_QUANT_CACHE_MB=0`)", False), ("on (default)", True)):
        runs = ", ".join(f"{t:.1f}" for t in times[key])
        print(f"| {name} | {runs} | {statistics.median(times[key]):.1f} |")
    print(f"\nratio off / on: {off / on:.2f}x")


if __name__ == "__main__":
    main()
