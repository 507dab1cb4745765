"""Where a finer unit of allocation pays (SmolLM2-135M, the main job's table, held-out KL).

The table's measured damage of each matrix is split over its output rows in proportion to each
row's output error ``dw_r^T H dw_r`` (the anchored table's own rule, a sum over rows), then
plans are solved by a Lagrangian over the budget in average bits and scored on held-out wiki
and bbc (16 x 512 tokens each):

    A  one format per tie group (q/k/v, gate/up tied)      B  one format per matrix (untied)
    C  + row-mixed pairs at 25/50/75 %, tied               D  the same, untied
    E  any format for any row (no ties)                     F  D with 12.5 % steps
    G  F tied

    MPQ_THREADS=2 PYTHONPATH=. python experiments/bench/bench_rows.py [BUDGET] [A,B,...]
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from mpq.compare import _estimator, _stats_task
from mpq.config import load_config
from mpq.cost import weight_bits
from mpq.evaluate import evaluate
from mpq.formats import QuantFormat
from mpq.layerstats import cached_input_stats
from mpq.models import cache_root
from mpq.pipeline import Evaluator, sensitivity_table
from mpq.prepared import prepare
from mpq.quant.quantize import dequantize, quantize
from mpq.targets import decisions

PLAIN = 6  # the first six formats of the config are the plain palette
PAIRS = [(0, 1), (0, 2), (1, 2), (2, 4)]  # 3+4nl, 3+4asym, 4nl+4asym, 4asym+6

Option = tuple[str, np.ndarray, float, float]  # label, format index per row, damage, bits


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 3.5
    variants = (sys.argv[2] if len(sys.argv) > 2 else "A,B,C,D,E,F,G").split(",")
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "2")))
    cfg = load_config("experiments/configs/smollm2_tied.toml")
    prep = prepare(cfg.model, cfg.include, cfg.exclude, cfg.ties)
    stats_task = _stats_task(cfg, prep.loaded)
    calib = cfg.calibration.spec().task(prep.loaded, 0)
    table = sensitivity_table(
        prep, _estimator(cfg.estimators[0], 0), cfg.formats, calib, stats_task=stats_task,
        progress=False,
    )  # fmt: skip
    names = [t.name for t in prep.targets]
    stats = cached_input_stats(
        prep.loaded.model, names, stats_task, model_id=prep.loaded.model_id,
        cache_root=cache_root() / "stats", full=names, progress=False,
    )  # fmt: skip
    fmts = list(cfg.formats)[:PLAIN]
    specs = [f.spec() for f in fmts]
    model = prep.loaded.model
    t0 = time.time()
    deq: dict[tuple[str, int], torch.Tensor] = {}
    err: dict[str, np.ndarray] = {}  # [rows, formats] output error per row (full H)
    err_diag: dict[str, np.ndarray] = {}  # the same weighted by the importance only
    for t in prep.targets:
        w = model.get_submodule(t.name).weight.detach()
        st = stats[t.name]
        assert st.full is not None
        e = np.zeros((w.shape[0], len(fmts)))
        ed = np.zeros_like(e)
        for k, f in enumerate(fmts):
            imp = st.diag if f.method == "mse" else None
            q = dequantize(quantize(w, f, importance=imp)).float()
            deq[(t.name, k)] = q
            dw = (q - w).double()
            e[:, k] = ((dw @ st.full.double()) * dw).sum(1).numpy()
            ed[:, k] = (dw * dw * st.diag.double()).sum(1).numpy()
        err[t.name], err_diag[t.name] = e, ed
    print(f"quantized {len(fmts)} formats in {time.time() - t0:.0f} s", flush=True)
    scale = {
        t.name: np.array([table.distortions[t.name][s] for s in specs]) / err[t.name].sum(0)
        for t in prep.targets
    }
    total = sum(t.numel for t in prep.targets)

    def options(steps: list[int]) -> dict[str, list[Option]]:
        out: dict[str, list[Option]] = {}
        for t in prep.targets:
            n, rows = t.name, t.shape[0]
            opts: list[Option] = [
                (specs[k], np.full(rows, k), float((err[n][:, k] * scale[n][k]).sum()),
                 float(weight_bits(tuple(t.shape), f)))
                for k, f in enumerate(fmts)
            ]  # fmt: skip
            for lo, hi in PAIRS if steps else []:
                order = np.argsort(-(err_diag[n][:, lo] - err_diag[n][:, hi]), kind="stable")
                for pct in steps:
                    ch = np.full(rows, lo)
                    ch[order[: (rows * pct + 50) // 100]] = hi
                    dmg = sum(float((err[n][ch == j, j] * scale[n][j]).sum()) for j in (lo, hi))
                    fm = QuantFormat.parse(f"{specs[lo]}+{specs[hi]}@{pct}")
                    opts.append((fm.spec(), ch, dmg, float(weight_bits(tuple(t.shape), fm))))
            out[n] = opts
        return out

    def lagrange(d: Callable[[float], float]) -> float:
        lo, hi = 1e-15, 1e3
        for _ in range(200):
            lam = (lo * hi) ** 0.5
            lo, hi = (lo, lam) if d(lam) <= budget else (lam, hi)
        return hi

    def by_groups(opts: dict[str, list[Option]], tied: bool) -> dict[str, np.ndarray]:
        groups = decisions(prep.targets) if tied else {t.name: [t] for t in prep.targets}
        table_ = []
        for members in groups.values():
            n_opts = len(opts[members[0].name])
            d = np.array([sum(opts[m.name][i][2] for m in members) for i in range(n_opts)])
            c = np.array([sum(opts[m.name][i][3] for m in members) for i in range(n_opts)])
            table_.append((members, d, c))

        def pick(lam: float) -> list[int]:
            return [int(np.argmin(d + lam * c)) for _, d, c in table_]

        def bits(lam: float) -> float:
            return sum(c[p] for (_, _, c), p in zip(table_, pick(lam), strict=True)) / total

        lam = lagrange(bits)
        return {
            m.name: opts[m.name][p][1]
            for (members, _, _), p in zip(table_, pick(lam), strict=True)
            for m in members
        }

    def rows_free() -> dict[str, np.ndarray]:
        d = np.concatenate([err[t.name] * scale[t.name] for t in prep.targets])
        c = np.concatenate(
            [np.tile(np.array([weight_bits(tuple(t.shape), f) for f in fmts]) / t.shape[0],
                     (t.shape[0], 1)) for t in prep.targets]
        )  # fmt: skip

        def bits(lam: float) -> float:
            ch = np.argmin(d + lam * c, axis=1)
            return float(c[np.arange(len(ch)), ch].sum()) / total

        ch = np.argmin(d + lagrange(bits) * c, axis=1)
        out, i = {}, 0
        for t in prep.targets:
            out[t.name], i = ch[i : i + t.shape[0]], i + t.shape[0]
        return out

    plain, mix, fine = options([]), options([25, 50, 75]), options([12, 25, 38, 50, 62, 75, 88])
    solvers: dict[str, Callable[[], dict[str, np.ndarray]]] = {
        "A": lambda: by_groups(plain, True), "B": lambda: by_groups(plain, False),
        "C": lambda: by_groups(mix, True), "D": lambda: by_groups(mix, False),
        "E": rows_free, "F": lambda: by_groups(fine, False), "G": lambda: by_groups(fine, True),
    }  # fmt: skip
    evals = {
        d: Evaluator(prep, cfg.evaluation.spec(d).task(prep.loaded), progress=False)
        for d in cfg.evaluation.data
    }
    print("| variant | budget | predicted (table) | " + " | ".join(
        f"{d} KL ± 1.96 se" for d in evals) + " |")  # fmt: skip
    print("|---|---|---|" + "---|" * len(evals), flush=True)
    for v in variants:
        choice = solvers[v]()
        pred = sum(
            float((err[n][np.arange(len(c)), c] * scale[n][c]).sum()) for n, c in choice.items()
        )
        m = copy.deepcopy(model)
        with torch.no_grad():
            for t in prep.targets:
                w = m.get_submodule(t.name).weight
                for k in range(len(fmts)):
                    sel = torch.from_numpy(choice[t.name] == k)
                    if sel.any():
                        w[sel] = deq[(t.name, k)][sel].to(w.dtype)
        cells = []
        for ev in evals.values():
            r = evaluate(ev.task, m, ev.reference())
            cells.append(f"{r['kl']:.4f} ± {1.96 * r['kl_se']:.4f}")
        print(f"| {v} | {budget} | {pred:.4f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
