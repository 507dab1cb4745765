"""Would a change of basis help SmolLM2's quantizers? Norm folding and residual rotation, per layer.

QuaRot / SpinQuant rotate the residual stream by an orthogonal ``Q`` (computational
invariance: RMSNorm commutes with ``Q`` once its weight ``g`` is folded into the layers that
read it), so the readers' weights become ``W diag(g) Q`` and the writers' ``Q^T W`` with the
same fp function. AWQ-style scaling is a diagonal change of the same kind. Before building
either into the pipeline this measures, for every 7th block's seven Linear layers, each
format's relative output error ``tr(dW H dW^T) / tr(W H W^T)`` in three bases:

- ``orig``: the checkpoint as it is;
- ``folded``: readers (q/k/v, gate/up) with their norm's weight folded in (writers unchanged);
- ``rotated``: folded readers times a random orthogonal ``Q``; writers (o/down) as ``Q^T W``;
  v/o's per-head and down's input bases are left alone (they would need online transforms).

Importance (``mse`` formats) comes from set ``--fit``; the error is scored under the second
moment of the independent set ``--score`` (both calibration splits: no held-out text), in
the same basis as the weights. Prints, per role and format, the geometric mean over layers of
each basis's error over ``orig``'s, and the share of layers where it is lower.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections import defaultdict

import torch

from mpq.formats import QuantFormat
from mpq.layerstats import cached_input_stats
from mpq.models import cache_root
from mpq.pipeline import prepare, task_for
from mpq.quant.quantize import dequantize, quantize

ATTN, MLP = "input_layernorm", "post_attention_layernorm"
READERS = {"q_proj": ATTN, "k_proj": ATTN, "v_proj": ATTN, "gate_proj": MLP, "up_proj": MLP}


def _stats(prep, spec: str, names: list[str]):  # type: ignore[no-untyped-def]
    data, n = spec.split(":")
    task = task_for(prep, data, "calib", int(n), 512, None)
    return cached_input_stats(
        prep.loaded.model, names, task, model_id=prep.loaded.model_id,
        cache_root=cache_root() / "stats", full=names,
    )  # fmt: skip


def _rel_err(w: torch.Tensor, fmt: QuantFormat, imp: torch.Tensor, h: torch.Tensor) -> float:
    q = dequantize(quantize(w.float(), fmt, importance=imp.float())).double()
    d = q - w
    return float(torch.einsum("ij,jk,ik->", d, h, d)) / float(torch.einsum("ij,jk,ik->", w, h, w))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fit", default="wiki:16")
    ap.add_argument("--score", default="bbc:16")
    ap.add_argument("--formats", default="3:g32:dq:mse,4:g32:nl:dq:mse,5:g32:dq:mse")
    ap.add_argument("--blocks", default="0,7,14,21,28")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    prep = prepare("smollm2-135m")
    model = prep.loaded.model
    blocks = {int(b) for b in args.blocks.split(",")}
    names = [t.name for t in prep.targets if t.kind == "linear"
             and int(re.search(r"layers\.(\d+)\.", t.name).group(1)) in blocks]  # type: ignore[union-attr]  # fmt: skip
    fit, score = _stats(prep, args.fit, names), _stats(prep, args.score, names)
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(args.seed)
    q_mat, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    fmts = [QuantFormat.parse(s) for s in args.formats.split(",")]
    ratios: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for n in names:
        role = n.rsplit(".", 1)[1]
        w = model.get_submodule(n).weight.detach().double()
        hf, hs = fit[n].full, score[n].full
        assert hf is not None and hs is not None
        bases = {"orig": (w, hf, hs)}
        if role in READERS:
            blk = re.sub(r"\.(self_attn|mlp)\..*$", "", n)
            g = model.get_submodule(f"{blk}.{READERS[role]}").weight.detach().double()
            wf, hf2, hs2 = w * g, hf / g[:, None] / g, hs / g[:, None] / g
            bases["folded"] = (wf, hf2, hs2)
            rot = (q_mat.T @ hf2 @ q_mat, q_mat.T @ hs2 @ q_mat)
            bases["rotated"] = (wf @ q_mat, *rot)
        else:
            bases["rotated"] = (q_mat.T @ w, hf, hs)
        for f in fmts:
            errs = {b: _rel_err(ww, f, torch.diagonal(h1), h2) for b, (ww, h1, h2) in bases.items()}
            for b, e in errs.items():
                if b != "orig":
                    ratios[(role, f.spec(), b)].append(e / errs["orig"])
    print(f"fit {args.fit}, score {args.score}, blocks {sorted(blocks)}, seed {args.seed}\n")
    print("| role | format | basis | error / orig: geo. mean | min | max | lower on |")
    print("|---|---|---|---|---|---|---|")
    for (role, spec, b), rs in ratios.items():
        gm = math.exp(sum(math.log(r) for r in rs) / len(rs))
        low = sum(r < 1 for r in rs)
        print(f"| {role} | `{spec}` | {b} | {gm:.3f} | {min(rs):.3f} | {max(rs):.3f} | "
              f"{low} / {len(rs)} |")  # fmt: skip


if __name__ == "__main__":
    main()
