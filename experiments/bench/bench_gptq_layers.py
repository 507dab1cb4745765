"""GPTQ vs RTN vs mse per layer of SmolLM2-135M, scored under an independent Hessian.

Every Linear target is quantized with Hessians / importance from calibration set A (``--fit``,
default wiki calib) and scored by the output error ``tr(dW H_B dW^T) / tr(W H_B W^T)`` under
the second moment of calibration set B (``--score``, default bbc calib): a held-out check of
the per-layer objective that uses no held-out text. Variants: rtn, mse (importance-weighted),
gptq (rtn grid), gptq with the importance-weighted mse grid, gptq act-order, gptq damp 0.1.
Prints per format the geometric mean of the error ratio to rtn over layers, the share of layers
where the variant beats rtn, and the worst layer, plus wall seconds for all layers.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from mpq.formats import QuantFormat
from mpq.layerstats import cached_input_stats
from mpq.models import cache_root
from mpq.pipeline import prepare, task_for
from mpq.quant.gptq import gptq_quantize
from mpq.quant.quantize import dequantize, quantize

VARIANTS = {
    "mse+imp": None,
    "gptq": {"grid": "rtn"},
    "gptq+mse": {"grid": "mse"},
    "gptq act": {"grid": "rtn", "act_order": True},
    "gptq+mse act": {"grid": "mse", "act_order": True},
    "gptq damp.1": {"grid": "rtn", "damp": 0.1},
}


def _stats(prep, spec: str, full: bool):  # type: ignore[no-untyped-def]
    data, n = spec.split(":")
    task = task_for(prep, data, "calib", int(n), 512, None)
    names = [t.name for t in prep.targets if t.kind == "linear"]
    return cached_input_stats(
        prep.loaded.model, names, task, model_id=prep.loaded.model_id,
        cache_root=cache_root() / "stats", full=names if full else (),
    )  # fmt: skip


def _err(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor, denom: float) -> float:
    d = q.double() - w.double()
    return float(torch.einsum("ij,jk,ik->", d, h, d)) / denom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fit", default="wiki:32")
    ap.add_argument("--score", default="bbc:16")
    ap.add_argument("--formats", default="4:g32,3:g32,4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layers", default="", help="regex of layer names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    prep = prepare("smollm2-135m")
    fit, score = _stats(prep, args.fit, True), _stats(prep, args.score, True)
    import re

    names = [n for n in fit if not args.layers or re.search(args.layers, n)]
    for spec in args.formats.split(","):
        fmt = QuantFormat.parse(spec)
        errs: dict[str, list[float]] = {"rtn": []}
        secs: dict[str, float] = {}
        for v in args.variants.split(","):
            errs[v] = []
            secs[v] = 0.0
        for n in names:
            w = prep.loaded.model.get_submodule(n).weight.detach()
            hb = score[n].full
            assert hb is not None
            denom = float(torch.einsum("ij,jk,ik->", w.double(), hb, w.double()))

            errs["rtn"].append(_err(dequantize(quantize(w, fmt)), w, hb, denom))
            for v in args.variants.split(","):
                t0 = time.perf_counter()
                if v == "mse+imp":
                    q = dequantize(quantize(w, QuantFormat.parse(spec + ":mse"),
                                            importance=fit[n].diag))  # fmt: skip
                else:
                    h = fit[n].full
                    assert h is not None
                    q = dequantize(gptq_quantize(w, h, fmt, **VARIANTS[v]).quantized)
                secs[v] += time.perf_counter() - t0
                errs[v].append(_err(q, w, hb, denom))
        base = torch.tensor(errs["rtn"])
        print(f"\n{spec}: rtn mean relative output error {float(base.mean()):.5f} "
              f"({len(names)} layers)")  # fmt: skip
        for v in args.variants.split(","):
            r = torch.tensor(errs[v]) / base
            worst = int(r.argmax())
            print(
                f"  {v:14s} geo-mean ratio to rtn {math.exp(float(r.log().mean())):.3f}  "
                f"better on {float((r < 1).double().mean()):.0%}  worst {float(r.max()):.2f} "
                f"({names[worst]})  {secs[v]:.1f} s"
            )


if __name__ == "__main__":
    main()
