"""Scientific checks of a comparison: do estimators predict measured damage, and where in depth
are the sensitive layers?"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from mpq.formats import QuantFormat
from mpq.sensitivity.table import SensitivityTable

_DEPTH = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Agreement:
    """Spearman rank correlation of one table's distortions with a reference table's: ``rho``
    over all (target, format) pairs (``n`` of them; the format axis alone makes this high),
    and ``rho_layers``, the mean over formats of the correlation across targets at one
    format: does the estimator rank the *layers* as the reference does?"""

    rho: float
    n: int
    rho_layers: float = math.nan


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


def _rank_corr(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return float(spearmanr(xs, ys).statistic)


def layer_spearman(table: SensitivityTable, ref: SensitivityTable) -> float:
    """Mean over the shared formats of the Spearman correlation across targets."""
    specs = sorted({s for row in table.distortions.values() for s in row})
    rhos = []
    for spec in specs:
        xs, ys = [], []
        for name, row in sorted(table.distortions.items()):
            other = ref.distortions.get(name, {})
            if spec in row and spec in other:
                xs.append(row[spec])
                ys.append(other[spec])
        rho = _rank_corr(xs, ys)
        if not math.isnan(rho):
            rhos.append(rho)
    return sum(rhos) / len(rhos) if rhos else math.nan


def spearman(table: SensitivityTable, ref: SensitivityTable) -> Agreement:
    xs, ys = paired(table, ref)
    return Agreement(_rank_corr(xs, ys), len(xs), layer_spearman(table, ref))


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


def additive_prediction(table: SensitivityTable, formats: Mapping[str, QuantFormat]) -> float:
    """The table's prediction for a whole plan: the sum of its single-layer distortions (what
    the solvers minimize), over the plan's targets the table scores; targets kept in high
    precision add 0. ``nan`` when the table lacks one of the plan's (target, format) pairs
    (e.g. a uniform format outside the candidates)."""
    total = 0.0
    for name, fmt in formats.items():
        if fmt.keep or name not in table.distortions:
            continue
        row = table.distortions[name]
        if fmt.spec() not in row:
            return math.nan
        total += row[fmt.spec()]
    return total
