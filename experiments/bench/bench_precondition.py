"""Benchmark preconditioning on SmolLM2-135M: none / scale_folding / awq before uniform RTN.

Per-channel asymmetric RTN at uniform 3 and 4 bits (``3:asym``, ``4:asym``), each after
``none``, ``scale_folding`` (alpha 0.5) and ``awq`` (searched at the same format as the plan):
held-out wiki perplexity with its 95% interval, KL to the fp32 model, and the calibration cost
(seconds of :func:`mpq.prepared.precondition`: statistics pass + search + fold).
Calibration: wiki calib split, ``--calib`` windows of ``--calib-len`` tokens; evaluation: wiki
heldout, ``--n`` windows of 512 tokens. The fp32 row checks that every transform kept the model:
its ppl must be the same with each preconditioner (printed as ``fp32 after <method>``).

Writes a Markdown table to stdout; paste it into BENCHMARKS.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from mpq.evaluate import EvalResult, evaluate, reference
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.pipeline import Prepared, prepare, task_for
from mpq.plan import uniform_plan
from mpq.precondition.spec import PreconditionSpec
from mpq.prepared import precondition


def _ppl(r: EvalResult) -> str:
    return f"{r['ppl']:.2f} [{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8, help="held-out windows of 512 tokens")
    ap.add_argument("--calib", type=int, default=4, help="calibration windows")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--bits", default="3:asym,4:asym", help="uniform formats, comma-separated")
    ap.add_argument("--alpha", type=float, default=0.5, help="scale folding migration strength")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    prep = prepare("smollm2-135m")
    heldout = task_for(prep, "wiki", "heldout", args.n, 512, None)
    calib = task_for(prep, "wiki", "calib", args.calib, args.calib_len, None)
    ref = reference(heldout, prep.loaded.model)
    fp = evaluate(heldout, prep.loaded.model, ref)
    formats = [QuantFormat.parse(s) for s in args.bits.split(",")]
    rows: list[tuple[str, str, str, str, str]] = [("fp32", "none", _ppl(fp), "0", "-")]
    sf_spec = PreconditionSpec("scale_folding", alpha=args.alpha)
    cache: dict[str, tuple[Prepared, float]] = {}
    for fmt in formats:
        plan = uniform_plan(prep.targets, fmt, "smollm2-135m")
        specs = [
            PreconditionSpec(),
            sf_spec,
            PreconditionSpec("awq", fmt=fmt.spec()),
        ]
        for spec in specs:
            key = spec.spec()
            if key not in cache:
                t0 = time.perf_counter()
                pp, _res = precondition(prep, spec, calib if spec.method != "none" else None)
                seconds = time.perf_counter() - t0
                cache[key] = (pp, seconds)
                if spec.method != "none":
                    after = evaluate(heldout, pp.loaded.model, ref)
                    rows.append(
                        (
                            "fp32",
                            spec.method,
                            _ppl(after),
                            f"{after['kl']:.1e}",
                            f"{seconds:.1f}",
                        )
                    )
            pp, seconds = cache[key]
            model = apply_plan(pp.loaded.model, plan, pp.targets, mode="fake")
            r = evaluate(heldout, model, ref)
            sec = "0" if spec.method == "none" else f"{seconds:.1f}"
            rows.append((f"uniform {fmt.spec()}", spec.method, _ppl(r), f"{r['kl']:.4f}", sec))
            print(f"# {rows[-1]}", flush=True)
    print(
        f"\nSmolLM2-135M, wiki heldout {args.n} x 512 tokens (ppl, 95% CI), calibration "
        f"{args.calib} x {args.calib_len} wiki calib tokens; {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| plan | precondition | ppl [95% CI] | KL to fp32 | calibration s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
