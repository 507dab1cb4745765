"""Statistics of each layer's input activations, for choosing activation bits (HAWQ-V2/V3 W+A).

("HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks",
extends mixed precision to activations; HAWQ-V3 quantizes weights and activations.) Activation
quantization error grows with the input's range and its tails, so per target we record, over
every element of every input the module receives on the calibration batches (forward
pre-hooks on the fp model; padding positions of encoder batches included):

- ``min``, ``max``, ``range = max - min``, ``absmax``, ``mean``, ``std`` (population);
- ``kurtosis``: Pearson's ``E[(x - mu)^4] / sigma^4`` (3 for a Gaussian; larger = heavier tails);
- ``outlier_ratio``: the fraction of elements with ``|x - mu| > outlier_sigmas * sigma``
  (default 6 sigma, which a Gaussian exceeds with probability 2e-9).

Two passes: the first gives ``mu`` and ``sigma``, the second the central moments and outliers.
A weight shared by several Linear/Conv2d modules pools their inputs. Embeddings (integer
inputs) are not supported. ``stat`` picks the table's score; all are in its extras. The table's
distortions are nominal (``score * ||dW||^2``) so the table still feeds any solver, but these
statistics describe activations, not weight damage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from mpq.errors import MpqError
from mpq.sensitivity.base import MATMUL_KINDS, Context, EstimatorBase, TargetResult, choice
from mpq.targets import Target

STATS = ("kurtosis", "outlier_ratio", "absmax", "range", "std")


class _Moments:
    def __init__(self) -> None:
        self.n = 0
        self.s1 = 0.0
        self.s2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.c2 = 0.0
        self.c4 = 0.0
        self.outliers = 0


@dataclass(frozen=True)
class ActivationStats(EstimatorBase):
    """Input-activation range, kurtosis and outlier ratio per layer (module docstring)."""

    name: ClassVar[str] = "activation"
    kinds: ClassVar[frozenset[str]] = MATMUL_KINDS
    view_params: ClassVar[tuple[str, ...]] = ("stat",)

    stat: str = "kurtosis"
    outlier_sigmas: float = 6.0

    def __post_init__(self) -> None:
        choice(self.stat, STATS, "stat")
        if not (isinstance(self.outlier_sigmas, (int, float)) and self.outlier_sigmas > 0):
            raise MpqError(f"outlier_sigmas={self.outlier_sigmas!r} must be positive")

    def label(self) -> str:
        return f"activation_{self.stat}"

    def group_size(self) -> int | None:
        return None

    def score(self, result: TargetResult, target: Target) -> float:
        return float(result.values[self.stat])

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        acc = {t.name: _Moments() for t in targets}
        modules: list[tuple[str, nn.Module]] = []
        for t in targets:
            for name in (t.name, *t.aliases):
                m = ctx.model.get_submodule(name)
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    modules.append((t.name, m))

        def run(second: bool) -> None:
            handles = []
            for key, m in modules:

                def hook(_m: nn.Module, args: tuple[Any, ...], key: str = key) -> None:
                    x = args[0].detach().double()
                    a = acc[key]
                    if not second:
                        a.n += x.numel()
                        a.s1 += float(x.sum())
                        a.s2 += float((x * x).sum())
                        a.lo = min(a.lo, float(x.min()))
                        a.hi = max(a.hi, float(x.max()))
                        return
                    mu, sigma = _mu_sigma(a)
                    d = x - mu
                    d2 = d * d
                    a.c2 += float(d2.sum())
                    a.c4 += float((d2 * d2).sum())
                    a.outliers += int((d.abs() > self.outlier_sigmas * sigma).sum())

                handles.append(m.register_forward_pre_hook(hook))
            try:
                ctx.calib.forward_all()
            finally:
                for h in handles:
                    h.remove()

        run(second=False)
        never = [n for n, a in acc.items() if a.n == 0]
        if never:
            raise MpqError(f"{never[:3]} never run on the calibration data; exclude them")
        run(second=True)
        out = {}
        for t in targets:
            a = acc[t.name]
            mu, _ = _mu_sigma(a)
            var = a.c2 / a.n
            out[t.name] = TargetResult(
                values={
                    "min": a.lo,
                    "max": a.hi,
                    "range": a.hi - a.lo,
                    "absmax": max(abs(a.lo), abs(a.hi)),
                    "mean": mu,
                    "std": math.sqrt(var),
                    "kurtosis": (a.c4 / a.n) / (var * var) if var > 0 else 0.0,
                    "outlier_ratio": a.outliers / a.n,
                    "elements": float(a.n),
                }
            )
        return out


def _mu_sigma(a: _Moments) -> tuple[float, float]:
    mu = a.s1 / a.n
    return mu, math.sqrt(max(a.s2 / a.n - mu * mu, 0.0))
