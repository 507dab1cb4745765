"""Reports of a comparison: ``report.md``, ``results.csv``, plots and the plans.

The verdict lines compare each mixed plan with the best uniform plan that uses no more
effective bits, on the primary metric of the task (perplexity, accuracy or KL), and say plainly
when the mixed plan loses.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq import __version__
from mpq.plan import BitPlan, atomic_write_text
from mpq.sensitivity.table import SensitivityTable

if TYPE_CHECKING:
    from mpq.config import CompareConfig, ReferencePoint


@dataclass(frozen=True)
class PlanEntry:
    """One plan of a comparison (:mod:`mpq.compare`): its name, policy, plan (None = the fp
    model), budget label, seed and the estimator/solver seconds it took."""

    name: str
    policy: str
    plan: BitPlan | None
    budget: str
    seed: int | None = None
    estimator_s: float = 0.0
    solver_s: float = 0.0


def primary_metric(rows: Sequence[dict[str, Any]]) -> tuple[str, bool]:
    """(metric, lower_is_better) for the rows of one dataset: the task's ``primary`` metric
    when the rows name it, else ppl, accuracy or KL, whichever they have first."""
    keys = set(rows[0]) if rows else set()
    named = str(rows[0].get("primary", "")) if rows else ""
    if named in keys:
        return named, named != "acc"
    if "ppl" in keys:
        return "ppl", True
    if "acc" in keys:
        return "acc", False
    return "kl", True


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}g}"
    return str(x)


def _unresolved(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> bool:
    """Whether two rows' ``metric`` differ by less than 1.96 standard errors of the difference
    of two independent estimates (``sqrt(se_a^2 + se_b^2)``; ppl compared as mean NLL, its log).
    False where the rows carry no standard errors. Unpaired, so it is conservative: plans scored
    on the same windows are usually resolved more finely by the paired KL columns."""
    value, se = ("nll", "nll_se") if metric == "ppl" else (metric, f"{metric}_se")
    try:
        diff = abs(float(a[value]) - float(b[value]))
        spread = math.hypot(float(a[se]), float(b[se]))
    except (KeyError, TypeError, ValueError):
        return False
    return math.isfinite(diff) and math.isfinite(spread) and spread > 0 and diff < 1.96 * spread


def _compare(mine: float, other: float, lower: bool) -> int:
    """+1 when ``mine`` is better than ``other``, -1 when worse, 0 when equal."""
    if mine == other:
        return 0
    return 1 if (mine < other) == lower else -1


def verdicts(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per mixed plan: does it beat the best uniform plan within its effective bits?
    Equal values are called ties, and a difference under 1.96 combined standard errors is
    marked as not resolved by the evaluation (:func:`_unresolved`)."""
    metric, lower = primary_metric(rows)
    uniform = [r for r in rows if r["policy"] == "uniform"]
    noise = " (within the evaluation's noise: 1.96 combined se)"
    out = []
    for r in rows:
        if r["policy"] in ("uniform", "fp32"):
            continue
        fits = [u for u in uniform if u["effective_bits"] <= r["effective_bits"] + 1e-9]
        above = [u for u in uniform if u["effective_bits"] > r["effective_bits"] + 1e-9]
        mine = r[metric]
        line = f"- **{r['plan']}** ({r['effective_bits']:.3f} bits, {metric} {_fmt(mine)}): "
        if not fits:
            line += "no uniform plan fits within its bits."
        else:
            best = (min if lower else max)(fits, key=lambda u: u[metric])
            c = _compare(mine, best[metric], lower)
            word = {1: "beats", 0: "ties with", -1: "LOSES to"}[c]
            line += (
                f"{word} the best uniform plan within its bits, {best['plan']} "
                f"({best['effective_bits']:.3f} bits, {metric} {_fmt(best[metric])})"
                f"{noise if c and _unresolved(r, best, metric) else ''}."
            )
        if above:
            nxt = min(above, key=lambda u: u["effective_bits"])
            c = _compare(mine, nxt[metric], lower)
            line += (
                f" The next uniform plan up, {nxt['plan']}, spends {nxt['effective_bits']:.3f} "
                f"bits and is {({1: 'worse', 0: 'equal', -1: 'better'})[c]} "
                f"({metric} {_fmt(nxt[metric])})"
                f"{noise if c and _unresolved(r, nxt, metric) else ''}."
            )
        out.append(line)
    return out


def _log_key(metric: str, lower: bool) -> Callable[[float], float]:
    """The scale the uniform curve is interpolated in: log for ppl and KL, else the metric
    (negated where higher is better)."""

    def key(x: float) -> float:
        if metric in ("ppl", "kl"):
            return math.log(x) if x > 0 else -math.inf
        return x if lower else -x

    return key


def _equal_uses(rows: Sequence[dict[str, Any]], metric: str, lower: bool) -> dict[str, float]:
    """Per mixed plan (by name): the uniform bits at which the uniform envelope reaches its
    ``metric`` (nan outside the curve's range or with fewer than two uniform plans)."""
    from mpq.solvers.guard import UniformPoint, equal_quality_use

    key = _log_key(metric, lower)
    points = [
        UniformPoint(str(r["plan"]), float(r["effective_bits"]), key(float(r[metric])))
        for r in rows
        if r["policy"] == "uniform" and math.isfinite(float(r[metric]))
    ]
    return {
        str(r["plan"]): (
            equal_quality_use(points, key(float(r[metric]))) if len(points) > 1 else math.nan
        )
        for r in rows
        if r["policy"] not in ("uniform", "fp32") and math.isfinite(float(r[metric]))
    }


def _has_kl_curve(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether every uniform row has a positive, finite KL (a curve to interpolate in log)."""
    kls = [float(r.get("kl", math.nan)) for r in rows if r["policy"] == "uniform"]
    return len(kls) > 1 and all(math.isfinite(k) and k > 0 for k in kls)


def bits_saved(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per mixed plan: the effective bits at which the uniform curve reaches its quality and the
    bits it saves (that minus its own bits; negative: uniform is better at equal bits).

    The uniform curve is interpolated linearly between adjacent uniform plans of its envelope
    (a uniform plan that a cheaper one beats is left out), in log of the metric for perplexity
    and KL (in the metric for accuracy); outside the curve's range the saving is not stated.
    Where the primary metric is not KL (perplexity, a probe's accuracy), the same is stated in
    KL to the fp32 model too: paired per position, it resolves differences that a ppl ratio
    near 1 leaves in its noise and that an accuracy saturated at the fp32 level cannot show,
    and the two readings can disagree (a plan can trade KL for ppl)."""
    metric, lower = primary_metric(rows)
    equal = _equal_uses(rows, metric, lower)
    with_kl = metric != "kl" and _has_kl_curve(rows)
    equal_kl = _equal_uses(rows, "kl", True) if with_kl else {}

    def cells(eq: float, bits: float) -> str:
        saved = eq - bits
        return (
            f"{_fmt(eq, 3) if math.isfinite(eq) else 'outside the uniform range'} | "
            f"{f'{saved:+.3f}' if math.isfinite(saved) else '-'} |"
        )

    lines = []
    for r in rows:
        name = str(r["plan"])
        if name not in equal:
            continue
        bits = float(r["effective_bits"])
        line = f"| {name} | {bits:.3f} | {_fmt(r[metric])} | {cells(equal[name], bits)}"
        if with_kl:
            line += f" {_fmt(r['kl'])} | {cells(equal_kl.get(name, math.nan), bits)}"
        lines.append(line)
    if not lines:
        return []
    how = f"log {metric}" if metric in ("ppl", "kl") else metric
    head = f"| plan | bits | {metric} | uniform bits at equal {metric} | bits saved |"
    rule = "|---|---|---|---|---|"
    if with_kl:
        head += " KL | uniform bits at equal KL | bits saved (KL) |"
        rule += "---|---|---|"
    return [
        f"Bits saved: the uniform bits that reach each plan's {metric} (uniform curve "
        f"interpolated in {how}, over the uniform plans that beat every cheaper one), minus "
        f"the plan's bits."
        + (" The last three columns do the same in KL (log KL)." if with_kl else ""),
        "",
        head,
        rule,
        *lines,
        "",
    ]


def reference_table(
    rows: Sequence[dict[str, Any]], references: Sequence[ReferencePoint]
) -> list[str]:
    """Markdown lines: each reference point of one data set against the best plan of this
    run at equal or fewer bits, both as ppl ratios to their own fp32 model."""
    from mpq.evaluate import Z95

    data = rows[0]["data"] if rows else ""
    fp = [r for r in rows if r["policy"] == "fp32"]
    if not fp or primary_metric(rows)[0] != "ppl":
        return []
    base = fp[0]["ppl"]
    plans = [r for r in rows if r["policy"] != "fp32"]
    lines = []
    for ref in references:
        got = ref.on(data)
        if got is None:
            continue
        ratio, ci = got
        fit = [r for r in plans if r["effective_bits"] <= ref.bits + 1e-9]
        theirs = f"{ratio:.3f}" + ("" if ci is None else f" ± {ci:.3f}")
        if not fit:
            lines.append(
                f"| {ref.label} | {ref.bits:.3f} | {theirs} | none at these bits | | | | |"
            )
            continue
        best = min(fit, key=lambda r: r["ppl"])
        mine = best["ppl"] / base
        kl = f"{best['kl']:.4f} ± {Z95 * best.get('kl_se', 0.0):.4f}"
        verdict = "lower" if mine < ratio else "higher"
        lines.append(
            f"| {ref.label} | {ref.bits:.3f} | {theirs} | {best['plan']} | "
            f"{best['effective_bits']:.3f} | {mine:.3f} | {kl} | {verdict} |"
        )
    if not lines:
        return []
    sources = "; ".join(dict.fromkeys(r.source for r in references if r.source))
    return [
        "Against other tools (config `[[reference]]`; each ratio is ppl over that evaluator's own "
        "fp32 ppl on its own windows, so ratios compare, raw ppl do not; a plan here is scored "
        "on the same windows as the fp32 model, so its paired uncertainty is the KL's, per "
        f"position){': ' + sources if sources else ''}:",
        "",
        "| reference | bits | its ratio | best plan here at <= its bits | bits | ratio | "
        "KL ± 1.96 se | mpq's ratio is |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def _table(rows: Sequence[dict[str, Any]]) -> str:
    metric, _ = primary_metric(rows)
    head = ["plan", "plans", "eff. bits", "model bits", "MB", "BOPs"]
    if metric == "ppl":
        head += ["ppl", "ppl 95% CI", "ppl se"]
    if "acc" in rows[0]:
        head += ["acc", "acc se"]
    head += ["KL", "KL se", "top-1 agree", "est. s", "solve s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["effective_bits"], r["plan"])):
        cells = [
            r["plan"],
            str(r.get("distinct_plans", 1)),
            f"{r['effective_bits']:.3f}",
            f"{r['model_bits']:.3f}",
            f"{r['bytes'] / 1e6:.2f}",
            f"{r['bops']:.3g}" if r["bops"] else "-",
        ]
        if metric == "ppl":
            se = r["ppl"] * r["nll_se"] if math.isfinite(r.get("nll_se", math.nan)) else math.nan
            cells += [_fmt(r["ppl"]), f"[{_fmt(r['ppl_lo'])}, {_fmt(r['ppl_hi'])}]", _fmt(se, 3)]
        if "acc" in r:
            cells += [_fmt(r["acc"]), _fmt(r["acc_se"], 2)]
        cells += [
            _fmt(r["kl"]),
            _fmt(r["kl_se"], 2),
            _fmt(r["agree"]),
            f"{r['estimator_s']:.0f}",
            f"{r['solver_s']:.3f}",
            f"{r['eval_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ppl_cap(rows: Sequence[dict[str, Any]]) -> float:
    """The top of a ppl axis: 4x the worst uniform plan (points above are marked, not drawn,
    so one broken policy does not flatten the others); no cap without uniform rows."""
    uniform = [r["ppl"] for r in rows if r["policy"] == "uniform" and math.isfinite(r["ppl"])]
    return 4 * max(uniform) if uniform else math.inf


def plot_quality(
    rows: Sequence[dict[str, Any]], path: Path, references: Sequence[ReferencePoint] = ()
) -> Path:
    """Primary metric vs effective bits, one panel per dataset, one line per policy; reference
    points of other tools (perplexity only) drawn at their ratio times this run's fp32 ppl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    datasets = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5), squeeze=False)
    for ax, data in zip(axes[0], datasets, strict=True):
        sub = [r for r in rows if r["data"] == data]
        metric, lower = primary_metric(sub)
        cap = _ppl_cap(sub) if metric == "ppl" else math.inf
        off: list[tuple[float, float, str]] = []
        for policy in dict.fromkeys(r["policy"] for r in sub):
            if policy == "fp32":
                continue
            mine = sorted(
                (r for r in sub if r["policy"] == policy), key=lambda r: r["effective_bits"]
            )
            off += [(r["effective_bits"], r[metric], policy) for r in mine if r[metric] > cap]
            mine = [r for r in mine if r[metric] <= cap]
            if not mine:
                continue
            pts = [(r["effective_bits"], r[metric], r["plan"]) for r in mine]
            xs, ys, _ = zip(*pts, strict=True)
            style = "o-" if policy == "uniform" else "s--"
            if metric == "ppl":
                err = [
                    [r["ppl"] - r["ppl_lo"] for r in mine],
                    [min(r["ppl_hi"], cap) - r["ppl"] for r in mine],
                ]
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=f"{policy} (95% CI)")
            else:
                ax.plot(xs, ys, style, label=policy)
            if policy == "uniform":
                for x, y, n in pts:
                    ax.annotate(
                        n.split(":", 1)[1],
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=8,
                    )
        stacked: dict[float, int] = {}
        for i, (x, y, policy) in enumerate(off):  # far worse than all uniform plans: marked
            k = stacked[x] = stacked.get(x, -1) + 1
            ax.plot(
                [x], [cap], "k^", ms=6, label=f"above {cap:.3g} (value written)" if i == 0 else None
            )
            ax.annotate(f"{policy.split('/')[0]} {y:.2g}", (x, cap), textcoords="offset points",
                        xytext=(4 + 10 * k, -8), fontsize=7, rotation=90, va="top")  # fmt: skip
        fp = [r for r in sub if r["policy"] == "fp32"]
        if fp:
            ax.axhline(fp[0][metric], color="gray", ls=":", label="fp32")
        if fp and metric == "ppl":
            drawn = [(ref, got[0]) for ref in references if (got := ref.on(data)) is not None]
            for i, (ref, ratio) in enumerate(drawn):
                y = ratio * fp[0]["ppl"]
                label = "other tools (their ppl ratio x this fp32)" if i == 0 else None
                ax.plot([ref.bits], [y], "r*", ms=10, label=label)
                ax.annotate(ref.label, (ref.bits, y), textcoords="offset points",
                            xytext=(5, -10), fontsize=7, color="darkred")  # fmt: skip
        if metric == "ppl":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            lo, hi = ax.get_ylim()
            # Label minor ticks only on a short axis (they collide over several decades).
            minor = FuncFormatter(lambda y, _: f"{y:g}") if hi / lo < 20 else NullFormatter()
            ax.yaxis.set_minor_formatter(minor)
        ax.set_xlabel("effective bits per target weight (scales included)")
        ax.set_ylabel(f"{metric} ({'lower' if lower else 'higher'} is better)")
        ax.set_title(f"{data}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _distinct(entries: Sequence[PlanEntry]) -> list[tuple[PlanEntry, str]]:
    """Each distinct (name, plan) once, with the seeds that gave it (``"seed 0,2"``)."""
    from mpq.pipeline import plan_digest

    seeds: dict[tuple[str, str], list[str]] = {}
    first: list[tuple[PlanEntry, tuple[str, str]]] = []
    for e in entries:
        if e.plan is None:
            continue
        key = (e.name, plan_digest(e.plan))
        if key not in seeds:
            seeds[key] = []
            first.append((e, key))
        if e.seed is not None:
            seeds[key].append(str(e.seed))
    return [(e, f"seed {','.join(seeds[k])}" if seeds[k] else "") for e, k in first]


def plot_bits(entries: Sequence[PlanEntry], path: Path) -> Path | None:
    """Per-layer weight bits of each distinct mixed plan (rows: plans, labelled with the seeds
    that gave them; columns: targets in model order)."""
    distinct = _distinct([e for e in entries if e.policy not in ("uniform", "fp32")])
    if not distinct:
        return None
    mixed = [e for e, _ in distinct]
    labels = [f"{e.name} ({tag})" if tag else e.name for e, tag in distinct]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(mixed[0].plan.formats) if mixed[0].plan else []
    grid = np.array([[e.plan.formats[n].code_bits for n in names] for e in mixed if e.plan])
    fig, ax = plt.subplots(figsize=(max(8, len(names) / 12), 1 + 0.5 * len(mixed)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(mixed)), labels)
    ax.set_xlabel("target (model order)")
    fig.colorbar(im, ax=ax, label="weight bits (codes; row-mixed: mean over rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _file_label(text: str) -> str:
    return text.replace("/", "_").replace(":", "-")


def plot_agreement(
    tables: Mapping[str, SensitivityTable], ref_label: str, path: Path
) -> Path | None:
    """Each estimator's predicted distortion against measured damage, per (layer, format)."""
    from mpq.analysis import paired

    others = [k for k in tables if k != ref_label]
    if not others:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(others), figsize=(4.5 * len(others), 4), squeeze=False)
    for ax, label in zip(axes[0], others, strict=True):
        xs, ys = paired(tables[label], tables[ref_label])
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
        if pts:
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], ".", alpha=0.5)
        ax.set_xlabel(f"{label}: predicted distortion")
        ax.set_ylabel(f"{ref_label}: measured")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def science(
    tables: Mapping[tuple[str, int], SensitivityTable], folder: Path, lowest_spec: str
) -> list[str]:
    """Spearman agreement with measured damage, and early/middle/late sensitivity."""
    from mpq.analysis import agreement_table, depth_profile

    if not tables:
        return []
    md = ["", "## Scientific checks", ""]
    seeds = sorted({s for _, s in tables})
    first = {label: t for (label, s), t in tables.items() if s == seeds[0]}
    ref = next((k for k in first if k.split(":")[0] == "measured"), None)
    if ref is not None and len(first) > 1:
        md += [
            f"Spearman ρ between each estimator's predicted distortion and the measured damage "
            f"(`{ref}`): over all (layer, format) pairs, and across layers at one format "
            f"(mean over formats; the ranking of layers a solver acts on):",
            "",
            "| estimator | " + " | ".join(f"seed {s}: ρ pairs / ρ layers" for s in seeds) + " |",
            "|---|" + "---|" * len(seeds),
        ]
        per_seed = {
            s: agreement_table({k: t for (k, ss), t in tables.items() if ss == s}, ref)
            for s in seeds
        }
        for label in first:
            if label == ref:
                continue
            cells = [
                f"{per_seed[s][label].rho:.3f} / {per_seed[s][label].rho_layers:.3f} "
                f"(n={per_seed[s][label].n})"
                if label in per_seed[s]
                else "-"
                for s in seeds
            ]
            md.append(f"| {label} | " + " | ".join(cells) + " |")
        if plot_agreement(first, ref, folder / "estimators_vs_measured.png"):
            md += ["", "![estimators vs measured damage](estimators_vs_measured.png)"]
    elif ref is None:
        md.append("(No `measured` estimator in this comparison: no agreement check.)")
    md += [
        "",
        f"Mean distortion at `{lowest_spec}` of the first 30%, middle and last 30% of blocks "
        f"(seed {seeds[0]}); CPTQuant claims the ends are the more sensitive:",
        "",
        "| estimator | early | middle | late | ends more sensitive? |",
        "|---|---|---|---|---|",
    ]
    for label, table in first.items():
        prof = depth_profile(table, lowest_spec)
        if not prof:
            md.append(f"| {label} | - | - | - | no block structure |")
            continue
        verdict = (
            "yes"
            if prof["early"] > prof["middle"] and prof["late"] > prof["middle"]
            else "early only"
            if prof["early"] > prof["middle"]
            else "late only"
            if prof["late"] > prof["middle"]
            else "no"
        )
        md.append(
            f"| {label} | {prof['early']:.4g} | {prof['middle']:.4g} | {prof['late']:.4g} "
            f"| {verdict} |"
        )
    return md


def _equal_loss(entries: Sequence[PlanEntry]) -> list[str]:
    """BAQ's equal-loss structure of every closed-form plan (see mpq.solvers.closed_form)."""
    rows = []
    for e, tag in _distinct(entries):
        m = e.plan.meta if e.plan is not None else {}
        if "equal_loss_interior" not in m:
            continue
        seed = f" ({tag})" if tag else ""
        rows.append(
            f"| {e.name}{seed} | {m['equal_loss_interior']} | {m['equal_loss_at_lower']} | "
            f"{m['equal_loss_at_upper']} | {_fmt(m.get('equal_loss_spread_relaxed'))} | "
            f"{_fmt(m.get('equal_loss_spread_plan'))} |"
        )
    if not rows:
        return []
    return [
        "",
        "## BAQ's equal-loss structure",
        "",
        "At the continuous optimum every layer inside its bit bounds has the same loss per "
        "weight; `spread` is the largest over the smallest of those losses (1 = equal): for the "
        "relaxed optimum (a check on the solver) and for the rounded plan's table distortions.",
        "",
        "| plan | inside bounds | at lowest | at highest | spread (relaxed) | spread (plan) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _preconditioning(entries: Sequence[PlanEntry]) -> list[str]:
    """One line per preconditioner: its calibration cost and the layers it could not fold."""
    seen: dict[str, Mapping[str, Any]] = {}
    for e in entries:
        rec = (e.plan.meta.get("precondition") if e.plan is not None else None) or {}
        if rec.get("method", "none") != "none":
            seen.setdefault(json.dumps(rec.get("params", {}), sort_keys=True) + rec["method"], rec)
    if not seen:
        return []
    md = ["", "## Preconditioning", ""]
    for rec in seen.values():
        skipped = [str(n) for n, _ in rec.get("not_folded", [])]
        tokens = rec.get("calib", {}).get("tokens", "?")
        listed = f" ({', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''})"
        md.append(
            f"- `{rec['method']}` {json.dumps(rec.get('params', {}))}: "
            f"{rec.get('seconds', float('nan')):.1f} s on {tokens} calibration tokens; "
            f"{len(skipped)} layers not folded" + (listed if skipped else "")
        )
    return md


def write_report(
    cfg: CompareConfig,
    folder: Path,
    rows: list[dict[str, Any]],
    seed_rows: list[dict[str, Any]],
    entries: Sequence[PlanEntry],
    tables: Mapping[tuple[str, int], SensitivityTable],
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        if entry.plan is not None:
            tag = f"~seed{entry.seed}" if entry.seed is not None else ""
            entry.plan.save(folder / "plans" / f"{_file_label(entry.name)}{tag}.json")
    for (label, seed), table in tables.items():
        table.save(folder / "sensitivity" / f"{_file_label(label)}~seed{seed}.json")
    atomic_write_text(folder / "results.csv", _csv(rows))
    atomic_write_text(folder / "results_by_seed.csv", _csv(seed_rows))
    plot_quality(rows, folder / "quality_vs_bits.png", cfg.references)
    bits_png = plot_bits(entries, folder / "plan_bits.png")
    e = cfg.evaluation
    c = cfg.calibration
    seeds = ", ".join(str(s) for s in cfg.seeds)
    sampling = (
        "each seed is a disjoint calibration sample of"
        if c.resample
        else "seeds vary the estimators' and searches' randomness only; one calibration sample of"
    )
    md = [
        f"# {cfg.name}",
        "",
        f"Model `{cfg.model}`; candidate formats {', '.join(f.spec() for f in cfg.formats)} "
        f"(RTN; `g<N>` = group size, else per output channel; `asym` = with zero-points; "
        f"fp16 scales unless noted). Effective bits count codes, scales and zero-points of "
        f"every target; model bits and MB count every tensor of the model.",
        f"Estimators: {', '.join(x.label for x in cfg.estimators)}. Seeds: {seeds} "
        f"({sampling} `{c.data[0]}` {c.split}, n={c.n}, seq_len={c.seq_len}). "
        f"Evaluation: {', '.join(e.data)} {e.split}, n={e.n}, seq_len={e.seq_len}. 95% CIs "
        f"are over evaluation units (windows / documents / images) pooled over seeds, each "
        f"distinct plan once (`plans`: how many distinct plans the seeds gave); `est. s` is "
        f"this run's estimator time (near 0 when cached).",
        f"Generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by mpq "
        f"{__version__} from `{cfg.source}`.",
        "",
        "![quality vs bits](quality_vs_bits.png)",
    ]
    if bits_png is not None:
        md += ["", "![per-layer bits of the mixed plans](plan_bits.png)"]
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        md += ["", f"## {data}", "", _table(sub), ""]
        md += bits_saved(sub)
        md += reference_table(sub, cfg.references)
        v = verdicts(sub)
        if v:
            md += ["Mixed vs uniform:", "", *v]
    md += _preconditioning(entries)
    md += _equal_loss(entries)
    lowest = min(cfg.formats, key=lambda f: f.bits).spec()
    md += science(tables, folder, lowest)
    md += additive_section(tables, entries, seed_rows)
    atomic_write_text(folder / "report.md", "\n".join(md) + "\n")
    return folder


def additive_section(
    tables: Mapping[tuple[str, int], SensitivityTable],
    entries: Sequence[PlanEntry],
    seed_rows: Sequence[dict[str, Any]],
) -> list[str]:
    """Per table: every plan made from it (and every uniform plan) with the table's additive
    prediction (:func:`mpq.analysis.additive_prediction`) next to the measured held-out KL on
    each dataset: how far the sum of single-layer damages is from the damage of the whole
    plan (interactions, and calibration vs held-out text)."""
    from mpq.analysis import additive_prediction

    datas = list(dict.fromkeys(str(r["data"]) for r in seed_rows if "kl" in r))
    if not tables or not datas:
        return []
    measured = {
        (str(r["plan"]), str(r["seeds"]), str(r["data"])): (float(r["kl"]), float(r["kl_se"]))
        for r in seed_rows
        if "kl" in r and "kl_se" in r
    }
    md: list[str] = []
    for (label, seed), table in tables.items():
        kl_units = table.estimator.startswith("measured")
        lines = []
        for e in entries:
            if e.plan is None or not (
                e.policy.startswith("uniform")
                or (e.policy.endswith("/" + label) and e.seed == seed)
            ):
                continue
            pred = additive_prediction(table, e.plan.formats)
            if not math.isfinite(pred):
                continue
            tag = "" if e.seed is None else str(e.seed)
            cells = [e.name, _fmt(pred)]
            for d in datas:
                kl, se = measured.get((e.name, tag, d), (math.nan, math.nan))
                cells.append(f"{_fmt(kl)} ± {_fmt(1.96 * se, 2)}")
                if kl_units:
                    cells.append(_fmt(kl / pred, 3) if pred > 0 else "-")
            lines.append("| " + " | ".join(cells) + " |")
        if not lines:
            continue
        head = ["plan", "table sum"]
        for d in datas:
            head += [f"{d} KL ± 1.96 se"] + (["measured / sum"] if kl_units else [])
        md += [
            "",
            f"### Additive prediction against measured KL: `{label}`, seed {seed}",
            "",
            "The table's prediction of each plan is the sum of its single-layer damages (what "
            "the solvers minimize"
            + (", a KL on calibration text" if kl_units else ", in the estimator's own units")
            + "); the measured KL is the whole plan's on held-out text"
            + (
                ". A ratio above 1: layers' errors add up to more than their sum (or the "
                "held-out text is harder than the calibration text); below 1: they partly cancel."
                if kl_units
                else "."
            ),
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *lines,
        ]
    return md
