"""Scientific checks of a comparison: do estimators predict measured damage, and where in depth
are the sensitive layers?"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from mpq.sensitivity.table import SensitivityTable

_DEPTH = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Agreement:
    """Spearman rank correlation of one table's distortions with a reference table's."""

    rho: float
    n: int


def paired(table: SensitivityTable, ref: SensitivityTable) -> tuple[list[float], list[float]]:
    """Distortions of the (target, format) pairs both tables have, in a fixed order."""
    xs, ys = [], []
    for name, row in sorted(table.distortions.items()):
        ref_row = ref.distortions.get(name, {})
        for spec, value in sorted(row.items()):
            if spec in ref_row:
                xs.append(value)
                ys.append(ref_row[spec])
    return xs, ys


def spearman(table: SensitivityTable, ref: SensitivityTable) -> Agreement:
    from scipy.stats import spearmanr

    xs, ys = paired(table, ref)
    if len(xs) < 3:
        return Agreement(math.nan, len(xs))
    rho = float(spearmanr(xs, ys).statistic)
    return Agreement(rho, len(xs))


def depth(name: str) -> int | None:
    """The block index in a target name (``model.layers.12.mlp.up_proj`` -> 12)."""
    m = _DEPTH.search(name)
    return int(m.group(1)) if m else None


def depth_profile(table: SensitivityTable, spec: str, edge: float = 0.3) -> dict[str, float]:
    """Mean distortion at ``spec`` of targets in the first ``edge``, the middle and the last
    ``edge`` of the blocks (CPTQuant's claim: the ends are more sensitive than the middle)."""
    by_block: dict[int, list[float]] = {}
    for name, row in table.distortions.items():
        d = depth(name)
        if d is not None and spec in row:
            by_block.setdefault(d, []).append(row[spec])
    blocks = sorted(by_block)
    if len(blocks) < 3:
        return {}
    k = max(1, int(round(edge * len(blocks))))
    groups = {"early": blocks[:k], "middle": blocks[k:-k] or blocks[k : k + 1], "late": blocks[-k:]}
    out = {}
    for g, members in groups.items():
        vals = [v for b in members for v in by_block[b]]
        out[g] = sum(vals) / len(vals)
    return out


def agreement_table(tables: Mapping[str, SensitivityTable], ref_label: str) -> dict[str, Agreement]:
    ref = tables[ref_label]
    return {label: spearman(t, ref) for label, t in tables.items() if label != ref_label}
