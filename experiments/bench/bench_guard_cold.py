"""The first `mpq solve` after a table: how many uniform plans its guard measures, and its time.

Runs the README's command (`mpq solve --model smollm2-135m --budget bits=B`, default guard) as
subprocesses with the evaluation cache hidden (each run is the first solve on these unseen
windows: nothing measured yet), from two source trees side by side, alternating: ``--old`` (a
checkout of an earlier commit, e.g. `git worktree add /tmp/old <rev>`) and this one. Counts the
plans each run measured (the entries it wrote to the hidden-then-fresh evaluation cache: the
mixed plan, the uniform plans and the fp reference's record) and its wall time. A warm-up
solve first fills the quantized-weight cache (``$MPQ_CACHE/quant``) for every format, so both
trees read the same stored weights. Run it on a ``$MPQ_CACHE`` holding the recipe's table
(after `make demo` or one `mpq solve`). Prints a Markdown table. Usage:

    MPQ_THREADS=2 python experiments/bench/bench_guard_cold.py --old /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]


def evals_dir() -> Path:
    from mpq.models import cache_root

    return cache_root() / "evals"


def solve(tree: Path, budget: float, out: Path) -> tuple[float, int]:
    """Wall seconds and evaluation-cache entries written by one cold `mpq solve` from ``tree``."""
    evals = evals_dir()
    hidden = evals.with_name("evals.bench-hidden")
    if evals.exists():
        evals.rename(hidden)
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [sys.executable, "-m", "mpq.cli", "solve", "--model", "smollm2-135m"]
        cmd += ["--budget", f"bits={budget}", "--out", str(out)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        entries = sum(1 for p in evals.rglob("*") if p.is_file()) if evals.exists() else 0
        return seconds, entries
    finally:
        if hidden.exists():
            shutil.rmtree(evals, ignore_errors=True)
            hidden.rename(evals)


def _answer(path: Path) -> tuple[object, ...]:
    """What a plan file says: every layer's format and the guard's verdict and numbers."""
    body = json.loads(path.read_text())["_data"]
    meta = body.get("meta", {})
    keys = ("guard", "uniform_below", "uniform_above", "equal_quality", "measured_mixed")
    return (json.dumps(body["formats"], sort_keys=True), *(meta.get(k) for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--old", required=True, type=Path, help="source tree of the earlier commit")
    ap.add_argument("--budgets", default="3.6,4.1,4.4")
    args = ap.parse_args()
    trees = {"old": args.old.resolve(), "new": HERE}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        solve(trees["old"], 4.2, Path(tmp) / "warm.json")  # fills the quantized-weight cache
        for i, b in enumerate(float(x) for x in args.budgets.split(",")):
            order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
            res = {t: solve(trees[t], b, Path(tmp) / f"{t}{b}.json") for t in order}
            plans = {t: _answer(Path(tmp) / f"{t}{b}.json") for t in order}
            rows.append((b, res, plans["old"] == plans["new"]))
    print("| budget | old: s, plans measured | new: s, plans measured | old / new | same answer |")
    print("|---|---|---|---|---|")
    for b, res, same in rows:
        (so, no), (sn, nn) = res["old"], res["new"]
        print(f"| bits={b} | {so:.1f}, {no} | {sn:.1f}, {nn} | {so / sn:.2f}x | {same} |")
    ratio = statistics.geometric_mean([r["old"][0] / r["new"][0] for _, r, _ in rows])
    print(f"\ngeometric mean old / new: {ratio:.2f}x")


if __name__ == "__main__":
    main()
