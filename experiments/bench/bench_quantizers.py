"""Quantizers side by side on SmolLM2-135M: rtn vs mse (unweighted / importance-weighted) vs
gptq vs the non-uniform nl grid, at uniform 3-6 bits in g32 / g64 / per-channel layouts.

Per format: bits per decoder weight including scales and zero-points (mpq.cost), the
held-out perplexity ratio to the fp32 model on wiki and bbc with its 95% interval (paired over
windows: ``exp(mean d +- 1.96 se(d))`` with ``d`` the per-window NLL difference), and the wall
time to quantize all target layers (statistics pass excluded; reported once).

Importance (``mean x^2`` per input column) and GPTQ Hessians come from the *calibration* splits
only (``--calib wiki:32,bbc:16``: windows of ``--calib-len`` tokens; never held-out text),
collected in one pass and cached under $MPQ_CACHE/stats. Variants per format spec:
``rtn``, ``mse`` (unweighted), ``mse+imp`` (importance-weighted), ``gptq`` (Hessians of the
full-precision model, rtn grid; the ``gptq+mse`` variant uses the importance-weighted mse grid
inside GPTQ), ``gptqseq`` / ``gptqseq+mse``: sequential GPTQ (``apply_plan(calib=...)``: each
layer's Hessian from the same calibration windows run through the partly quantized model,
:mod:`mpq.sequential`; its statistics pass is part of the quantize time).

Each finished row is appended to ``--out`` (JSON lines), so a killed run resumes; ``--table``
prints the Markdown table from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from mpq.evaluate import Z95, EvalResult, evaluate, reference
from mpq.executor import apply_plan, data_targets
from mpq.formats import QuantFormat
from mpq.layerstats import InputStats, cached_input_stats, merge_stats
from mpq.models import cache_root
from mpq.pipeline import prepare, task_for
from mpq.plan import uniform_plan
from mpq.quant.gptq import GPTQConfig

VARIANTS = ("rtn", "mse", "mse+imp", "gptq", "gptq+mse", "gptqseq", "gptqseq+mse")


DEFAULT_ROWS = (
    "4:g32=rtn,mse,mse+imp,gptq;4:g32:nl=rtn,mse+imp;4:g64=rtn,mse+imp;"
    "4=rtn,mse+imp;3:g32=rtn,mse,mse+imp,gptq;5:g32=rtn,mse+imp;6:g32=rtn,mse+imp;"
    "3:g64=rtn,mse+imp;5:g64=rtn,mse+imp;6:g64=rtn,mse+imp;3=rtn,mse+imp;5=rtn,mse+imp;"
    "6=rtn,mse+imp;4:g32=gptq+mse"
)


def _rows(text: str) -> list[tuple[str, list[str]]]:
    out = []
    for part in text.split(";"):
        spec, _, variants = part.partition("=")
        vs = [v for v in variants.split(",") if v]
        bad = [v for v in vs if v not in VARIANTS]
        if bad:
            raise SystemExit(f"unknown variants {bad}; use {list(VARIANTS)}")
        out.append((spec, vs))
    return out


def _ratio(q: EvalResult, fp: EvalResult) -> dict[str, float]:
    d = torch.tensor(q.units["nll"], dtype=torch.float64) - torch.tensor(
        fp.units["nll"], dtype=torch.float64
    )
    mean = float(d.mean())
    se = float(d.std(unbiased=True) / math.sqrt(d.numel()))
    return {
        "ratio": math.exp(mean),
        "lo": math.exp(mean - Z95 * se),
        "hi": math.exp(mean + Z95 * se),
        "ppl": q["ppl"],
    }


def _fmt(spec: str, variant: str) -> QuantFormat:
    base = QuantFormat.parse(spec)
    method = variant.split("+")[0].replace("gptqseq", "gptq")
    from dataclasses import replace

    return replace(base, method=method)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    prep = prepare("smollm2-135m")
    model = prep.loaded.model
    names_all = [t.name for t in prep.targets if t.kind == "linear"]
    out = Path(args.out)
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["spec"], r["variant"]))
    evals = {}
    for data in ("wiki", "bbc"):
        task = task_for(prep, data, "heldout", args.n, 512, None)
        ref = reference(task, model)
        evals[data] = (task, ref, evaluate(task, model, ref))
    stats: dict[str, InputStats] = {}
    need_full = any(v.startswith("gptq") for _, vs in _rows(args.rows) for v in vs)
    t0 = time.perf_counter()
    parts = []
    calib_tasks = []
    for item in args.calib.split(","):
        data, n = item.split(":")
        task = task_for(prep, data, "calib", int(n), args.calib_len, None)
        calib_tasks.append(task)
        parts.append(
            cached_input_stats(
                model,
                names_all,
                task,
                model_id=prep.loaded.model_id,
                cache_root=cache_root() / "stats",
                full=names_all if need_full else (),
            )
        )
    stats = merge_stats(parts)
    calib_batches = [b for t in calib_tasks for b in t.batches]
    stats_s = time.perf_counter() - t0
    print(f"statistics: {stats_s:.1f} s (cached after the first run)", flush=True)
    for spec, variants in _rows(args.rows):
        for variant in variants:
            if (spec, variant) in done:
                continue
            fmt = _fmt(spec, variant)
            plan = uniform_plan(prep.targets, fmt, prep.loaded.model_id)
            use = stats if variant in ("mse+imp", "gptq", "gptq+mse") else {}
            names, _ = data_targets(plan, prep.targets)
            seq = variant.startswith("gptqseq")
            cfg = GPTQConfig(
                grid="mse" if variant.endswith("+mse") and "gptq" in variant else "rtn",
                sequential="layer" if seq else "off",
            )
            t = time.perf_counter()
            given = {n: use[n] for n in names if n in use}
            if seq:
                qmodel = apply_plan(
                    model, plan, prep.targets, mode="fake", calib=calib_batches, gptq=cfg
                )
            else:
                qmodel = apply_plan(model, plan, prep.targets, mode="fake", stats=given, gptq=cfg)
            quant_s = time.perf_counter() - t
            row: dict[str, Any] = {
                "spec": spec,
                "variant": variant,
                "bits": prep.cost.plan_cost(plan).effective_bits,
                "quant_s": quant_s,
            }
            for data, (task, ref, fp) in evals.items():
                row[data] = _ratio(evaluate(task, qmodel, ref), fp)
            del qmodel
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def table(path: Path) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    print(
        "| format | method | bits/weight | wiki ppl ratio [95% CI] | bbc ppl ratio [95% CI] "
        "| quantize s |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        w, b = r["wiki"], r["bbc"]
        print(
            f"| `{r['spec']}` | {r['variant']} | {r['bits']:.3f} | {w['ratio']:.3f} "
            f"[{w['lo']:.3f}, {w['hi']:.3f}] | {b['ratio']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}] "
            f"| {r['quant_s']:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=32, help="held-out windows of 512 tokens per text")
    ap.add_argument("--calib", default="wiki:32,bbc:16", help="calibration data:windows, ...")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="spec=variant,...;spec=...")
    ap.add_argument("--out", default="bench_quantizers.jsonl")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args()
    if args.table:
        table(Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
