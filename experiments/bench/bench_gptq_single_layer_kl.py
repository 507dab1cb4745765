"""GPTQ vs RTN one layer at a time (SmolLM2-135M, 4:g32).

For each chosen layer: the layer objective ``tr(dW H dW^T)`` under the fitting Hessian (wiki
calibration windows) next to the KL measured on bbc held-out windows with only that layer
quantized. Prints one line per layer. Not part of the test suite.
"""

from __future__ import annotations

import argparse

import torch

from mpq.evaluate import evaluate, reference
from mpq.formats import QuantFormat
from mpq.layerstats import collect_input_stats
from mpq.prepared import prepare
from mpq.quant.gptq import gptq_quantize
from mpq.quant.quantize import dequantize, fake_quantize
from mpq.tasks import CalibSpec

MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", default="3,15,27")
    ap.add_argument("--format", default="4:g32")
    ap.add_argument("--fit", type=int, default=8, help="wiki calib windows for the Hessian")
    ap.add_argument("--score", type=int, default=4, help="bbc held-out windows for the KL")
    args = ap.parse_args()
    torch.set_num_threads(2)
    prep = prepare("smollm2-135m")
    model = prep.loaded.model
    blocks = [int(b) for b in args.blocks.split(",")]
    names = [f"model.layers.{i}.{m}" for i in blocks for m in MODULES]
    calib = CalibSpec("wiki", "calib", args.fit, 512).task(prep.loaded)
    stats = collect_input_stats(model, names, calib, full=names)
    task = CalibSpec("bbc", "heldout", args.score, 512).task(prep.loaded)
    ref = reference(task, model)
    fmt = QuantFormat.parse(args.format)
    for name in names:
        weight = model.get_submodule(name).weight
        original = weight.detach().clone()
        hessian = stats[name].full
        assert hessian is not None
        out = {}
        for kind in ("rtn", "gptq", "gptq_rtn"):
            if kind == "rtn":
                wq = fake_quantize(original, fmt)
            else:
                grid = "mse" if kind == "gptq" else "rtn"
                res = gptq_quantize(original, hessian, fmt, grid=grid)
                wq = dequantize(res.quantized).to(original.dtype)
            d = (wq - original).double()
            objective = float(torch.einsum("ij,jk,ik->", d, hessian.double(), d))
            with torch.no_grad():
                weight.copy_(wq)
            out[kind] = (evaluate(task, model, ref)["kl"], objective)
            with torch.no_grad():
                weight.copy_(original)
        cells = {k: f"KL {v[0]:.5f} objective {v[1]:.3e}" for k, v in out.items()}
        print(name, cells, flush=True)


if __name__ == "__main__":
    main()
