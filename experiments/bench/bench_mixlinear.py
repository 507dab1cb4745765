"""Row- and column-mixed packed layers: the forward with the mask's indices kept (now) against
unpacking the mask and indexing by it on every call (before), side by side in one run.

One SmolLM2 down_proj-shaped layer (576 x 1536), the main job's mixes
(`3:g32:dq:mse+4:g32:nl:dq:mse@75` rows, `...#11` columns), reference backend; decode (1 token)
and prefill (128 tokens); median of interleaved rounds (torch.utils.benchmark). The outputs of
the two forwards are asserted equal bit for bit.

    MPQ_THREADS=2 PYTHONPATH=. python experiments/bench/bench_mixlinear.py
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.benchmark import Timer

from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.kernels.modules import ColMixLinear, RowMixLinear
from mpq.plan import uniform_plan
from mpq.targets import discover

SPECS = ("3:g32:dq:mse+4:g32:nl:dq:mse@75", "3:g32:dq:mse+4:g32:nl:dq:mse#11")


def before(layer: RowMixLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward as it was: the mask unpacked and used as a boolean index per call."""
    mask = layer.mask().to(x.device)
    if isinstance(layer, ColMixLinear):
        return layer.low(x[..., ~mask]) + layer.high(x[..., mask])
    lo, hi = layer.low(x), layer.high(x)
    y = lo.new_empty(*lo.shape[:-1], layer.rows)
    y[..., ~mask] = lo
    y[..., mask] = hi
    return y


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(1536, 576, bias=False))
    targets = discover(lin)
    print("| mix | tokens | before (ms) | now (ms) | before / now |")
    print("|---|---|---|---|---|")
    for spec in SPECS:
        plan = uniform_plan(targets, QuantFormat.parse(spec), "bench")
        layer = apply_plan(lin, plan, targets, mode="packed")[0]
        for tokens in (1, 128):
            x = torch.randn(tokens, 1536)
            with torch.no_grad():
                assert torch.equal(before(layer, x), layer(x))
            timers = {
                "before": Timer("f(layer, x)", globals={"f": before, "layer": layer, "x": x}),
                "now": Timer("layer(x)", globals={"layer": layer, "x": x}),
            }
            got: dict[str, list[float]] = {k: [] for k in timers}
            with torch.no_grad():
                for _ in range(5):  # interleaved rounds
                    for k, t in timers.items():
                        got[k].append(t.blocked_autorange(min_run_time=0.3).median)
            b = sorted(got["before"])[2] * 1e3
            n = sorted(got["now"])[2] * 1e3
            kind = "columns" if "#" in spec else "rows"
            print(f"| {kind} `{spec}` | {tokens} | {b:.3f} | {n:.3f} | {b / n:.2f}x |")


if __name__ == "__main__":
    main()
