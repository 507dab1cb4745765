"""Plot a sensitivity table: per-layer scores by depth, coloured by module type (PNG)."""

from __future__ import annotations

import re
from pathlib import Path

from mpq.errors import MpqError
from mpq.sensitivity.table import SensitivityTable

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The first integer component of a module name (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """The name without its layer-index prefix (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``).

    Names without an index (embeddings, heads) are their own type.
    """
    m = _INDEX.search(name)
    if not m:
        return name
    rest = name[m.end() :]
    return rest or name[: m.start()] or name


def depths(names: list[str]) -> dict[str, float]:
    """x position per name: its layer index; unindexed names before/after the indexed ones."""
    idx = {n: layer_index(n) for n in names}
    known = [i for i in idx.values() if i is not None]
    lo, hi = (min(known), max(known)) if known else (0, 0)
    seen_indexed = False
    out: dict[str, float] = {}
    for n in names:
        i = idx[n]
        if i is not None:
            seen_indexed = True
            out[n] = float(i)
        else:
            out[n] = float(hi + 1) if seen_indexed else float(lo - 1)
    return out


def plot_sensitivity(table: SensitivityTable, path: str | Path, title: str | None = None) -> Path:
    """Draw ``table``'s scores by depth (log y), one colour per module type, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not table.scores:
        raise MpqError("the sensitivity table has no scores to plot")
    out = Path(path)
    if out.is_dir():
        raise MpqError(f"{str(out)!r} is a folder; give the path of the PNG to write")
    names = list(table.scores)
    x = depths(names)
    types: dict[str, list[str]] = {}
    for n in names:
        types.setdefault(module_type(n), []).append(n)
    positive = [n for n in names if table.scores[n] > 0]
    use_log = bool(positive)
    fig = Figure(figsize=(10, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.6 / max(len(types), 1)
    offsets = {t: (k - (len(types) - 1) / 2) * width for k, t in enumerate(types)}
    for t, members in types.items():
        shown = [n for n in members if table.scores[n] > 0] if use_log else members
        if not shown:
            continue
        xs = [x[n] + offsets[t] for n in shown]
        ys = [table.scores[n] for n in shown]
        errs = [table.stderr.get(n, 0.0) for n in shown]
        if any(errs):
            ax.errorbar(xs, ys, yerr=errs, fmt="o-", ms=4, lw=1, capsize=2, label=t)
        else:
            ax.plot(xs, ys, "o-", ms=4, lw=1, label=t)
    if use_log:
        ax.set_yscale("log")
    hidden = len(names) - len(positive)
    note = f" ({hidden} non-positive scores not shown)" if use_log and hidden else ""
    ax.set_xlabel("layer index (depth)")
    ax.set_ylabel(f"score ({table.estimator})")
    ax.set_title(title or f"{table.estimator} on {table.model_id} / {table.data_id}{note}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(types) > 8 else 1, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
