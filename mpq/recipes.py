"""What ``mpq solve`` and ``mpq export`` use when the command line does not say: per bundled
model, the candidate formats, the anchor of the measured table, where the importance of
``:mse`` formats comes from, and the table's calibration windows.

The SmolLM2 recipe is the main job's (``experiments/configs/smollm2.toml``, measured in
BENCHMARKS.md "Main job" and "Calibration that generalizes"): the importance-weighted k-quant
palette with row- and column-mixed formats of it, one decision per matrix (no q/k/v, gate/up
ties), the table measured at one anchor format and carried to the others by each layer's
output error, importance from 16 x 512 tokens. Every other model (MiniLM, MobileNetV2, a local
Hugging Face folder) gets the generic recipe: per-channel rtn formats, which fit every layer
shape, a fully measured table, no importance. Torch-free (read while parsing arguments).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Defaults of one model: ``formats`` (comma-separated specs), ``anchor`` (a format spec,
    or None for a fully measured table), ``stats`` (``DATA:SPLIT:NxLEN``, or None: the
    calibration windows), and the table's calibration ``data``, ``n`` windows of ``seq_len``;
    ``ties``: whether q/k/v and gate/up are one decision."""

    formats: str
    anchor: str | None
    stats: str | None
    data: str
    n: int
    seq_len: int
    ties: bool = True  # q/k/v and gate/up share one format (fused kernels need it)


GENERIC = Recipe("3,4,5,6,8", None, None, "wiki", 2, 128)

RECIPES: dict[str, Recipe] = {
    "smollm2-135m": Recipe(
        formats=",".join(
            [
                "3:g32:dq:mse",
                "4:g32:nl:dq:mse",
                "4:g32:asym:dq:mse",
                "5:g32:dq:mse",
                "6:g32:dq:mse",
                "8:g32:dq",
                "3:g32:dq:mse+4:g32:nl:dq:mse@75",
                "3:g32:dq:mse+4:g32:asym:dq:mse@50",
                "4:g32:nl:dq:mse+4:g32:asym:dq:mse@50",
                "4:g32:asym:dq:mse+6:g32:dq:mse@25",
                "4:g32:asym:dq:mse+6:g32:dq:mse@50",
                "3:g32:dq:mse+4:g32:nl:dq:mse#6",
                "3:g32:dq:mse+4:g32:nl:dq:mse#11",
                "3:g32:dq:mse+4:g32:nl:dq:mse#22",
            ]
        ),  # fmt: skip
        anchor="4:g32:nl:dq:mse",
        stats="wiki+bbc:calib:16x512",
        data="wiki+bbc",
        n=4,
        seq_len=256,
        ties=False,
    ),
}


def recipe_for(model: str) -> Recipe:
    """The recipe of a bundled model id, else :data:`GENERIC`."""
    return RECIPES.get(model, GENERIC)
