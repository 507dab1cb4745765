"""Calibration that generalizes (issue 16 item 2): how much calibration text, and from where,
the measured table needs, judged by held-out quality of the plans it leads to.

Each variant reruns ``mpq compare`` on the main job's config (``experiments/configs/
smollm2.toml`` by default) with its ``[calibration]`` (the measured table's windows) and
optionally its ``[statistics]`` (the importance behind the ``:mse`` formats) replaced, no
uniform plans, and ILP plans at ``--budgets``; held-out evaluation as in the config (wiki and
bbc held-out). A variant is ``DATA:NxLEN`` or ``DATA:NxLEN:stats=DATA:NxLEN``; ``DATA`` may be
a mixture such as ``wiki+bbc`` (equal windows from each, :func:`mpq.data.text_windows`).

Every compare keeps its own report under ``--out``/<variant>/ and its tables in $MPQ_CACHE, so
a killed run resumes; ``--table`` prints the Markdown table (ppl ratio to fp32 on the same
windows, KL +- 1.96 se paired per position, the table's wall time) from the reports.

    MPQ_THREADS=1 python experiments/bench/bench_calibration.py --out calib-study \\
        --variants wiki:1x256 wiki:4x256 wiki:16x256 wiki+bbc:4x256:stats=wiki+bbc:16x512
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import re
from pathlib import Path

from mpq.config import DataSpec, SolveSpec, load_config
from mpq.cost import parse_budget

Z95 = 1.96


def _data(text: str, base: DataSpec) -> DataSpec:
    m = re.fullmatch(r"([a-z+]+):(\d+)x(\d+)", text)
    if m is None:
        raise SystemExit(f"bad data {text!r}: use DATA:NxLEN, e.g. wiki:4x256 or wiki+bbc:4x256")
    return dataclasses.replace(
        base, data=(m.group(1),), split="calib", n=int(m.group(2)), seq_len=int(m.group(3))
    )


def _label(variant: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")


def run(config: Path, variants: list[str], budgets: list[str], out: Path) -> None:
    from mpq.compare import run_compare

    cfg = load_config(config)
    solve = SolveSpec("ilp", tuple(parse_budget(b) for b in budgets))
    for variant in variants:
        calib, _, stats = variant.partition(":stats=")
        c = _data(calib, cfg.calibration)
        s = cfg.statistics if not stats else _data(stats, cfg.statistics or cfg.calibration)
        name = f"calib-{_label(variant)}"
        if (out / name / "results.csv").is_file():
            print(f"{variant}: done earlier ({out / name})")
            continue
        one = dataclasses.replace(
            cfg, name=name, calibration=c, statistics=s, uniform=(), solves=(solve,)
        )
        print(f"{variant}: calibration {c.data[0]} {c.n}x{c.seq_len}, statistics "
              f"{'(calibration)' if s is None else f'{s.data[0]} {s.n}x{s.seq_len}'}")  # fmt: skip
        run_compare(one, out)


def table(variants: list[str], out: Path) -> str:
    lines = [
        "| calibration (table) | tokens | statistics | table s | plan | bits | wiki ratio | "
        "wiki KL +- 1.96 se | bbc ratio | bbc KL +- 1.96 se |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        calib, _, stats = variant.partition(":stats=")
        path = out / f"calib-{_label(variant)}" / "results.csv"
        if not path.is_file():
            lines.append(f"| {calib} | | {stats or 'config'} | not run | | | | | | |")
            continue
        rows = list(csv.DictReader(path.open()))
        fp = {r["data"]: float(r["ppl"]) for r in rows if r["plan"] == "fp32"}
        n, length = calib.split(":")[1].split("x")
        table_s = max(float(r["estimator_s"] or 0) for r in rows)
        by_plan: dict[str, dict[str, dict[str, str]]] = {}
        for r in rows:
            if r["plan"] != "fp32":
                by_plan.setdefault(r["plan"], {})[r["data"]] = r
        for plan, per in by_plan.items():
            cells = []
            for data_id in ("wiki", "bbc"):
                r = per.get(data_id)
                if r is None:
                    cells += ["", ""]
                    continue
                kl, se = float(r["kl"]), float(r["kl_se"])
                cells += [f"{float(r['ppl']) / fp[data_id]:.3f}", f"{kl:.4f} +- {Z95 * se:.4f}"]
            bits = float(next(iter(per.values()))["effective_bits"])
            lines.append(
                f"| {calib} | {int(n) * int(length)} | {stats or 'config'} | {table_s:.0f} | "
                f"{plan} | {bits:.3f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("experiments/configs/smollm2.toml"))
    ap.add_argument("--variants", nargs="+", default=["wiki:1x256", "wiki:4x256", "wiki:16x256"])
    ap.add_argument("--budgets", nargs="+", default=["bits=3.5", "bits=4.0", "bits=4.45"])
    ap.add_argument("--out", type=Path, default=Path("calib-study"))
    ap.add_argument("--table", action="store_true", help="only print the table of finished runs")
    args = ap.parse_args()
    if not args.table:
        run(args.config, args.variants, args.budgets, args.out)
    print(table(args.variants, args.out))


if __name__ == "__main__":
    main()
