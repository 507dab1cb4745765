"""NNCF side by side (issue 16): NNCF's mixed INT4/INT8 weight compression against mpq's ILP on
the same two-format palette, and what mpq's full palette adds at the same bits.

1. **NNCF in its own venv** (``setup``): ``$MPQ_CACHE/nncf-venv`` (``--venv``) gets
   ``torch==2.13.0`` (the local CPU wheel, installed first and exactly, so nothing pulls a CUDA
   build), ``nncf==3.4.0``, ``accelerate`` and the ``transformers`` version of mpq's own venv,
   by pip. Never mpq's ``.venv``, never ``make test``.
2. **Compression** (``compress``): for each ``--ratios`` value, this file is run by the NNCF
   venv's Python (the ``_worker`` command, which imports no mpq): it loads mpq's cached fp32
   SmolLM2 folder (``$MPQ_CACHE/models/smollm2-135m-fp32``, the bundled GGUF converted once by
   :mod:`mpq.models`) and calls ``nncf.compress_weights(mode=INT4_ASYM, group_size=64,
   ratio=r, backup_mode=INT8_ASYM, sensitivity_metric=HESSIAN_INPUT_ACTIVATION,
   dataset=...)`` on mpq's calibration windows (the main job's ``[statistics]`` windows: wiki+bbc
   calib, 16 x 512 tokens, written by the parent as a tensor file). NNCF's defaults (``all_layers
   =False``) put the embedding and the last MatMul (SmolLM2's head is tied to the embedding) in
   the backup precision INT8_ASYM and leave them out of the ratio; the ratio is over the 210
   decoder Linear weights, what mpq targets. Each compressed weight's decompressor (NNCF's own
   forward) gives its dequantized weight and its type (INT4 asym g64 / INT8 asym per channel);
   they are saved with the run's log and wall time. Nothing downloads.
3. **Scoring** (``evaluate``, resumable; ``--limit-s`` stops between rows): mpq's held-out
   evaluator (:class:`mpq.pipeline.Evaluator`, the main job's ``[evaluation]``: wiki and bbc
   held-out, 16 x 512 tokens each) on

   - NNCF's dequantized decoder weights in the fp32 model (embedding/head fp32, as in every mpq
     plan), and, for ``--as-is`` ratios, NNCF's whole model (embedding/head INT8 too);
   - NNCF's per-layer choice as an mpq plan over ``4:g64:asym`` / ``8:asym`` (mpq's RTN of the
     same formats), with how close mpq's weights are to NNCF's;
   - mpq's ILP over ``4:g64:asym`` / ``8:asym`` at NNCF's bits and on a grid of budgets, from a
     measured-KL table (the main job's recipe: ``measured:anchor=4:g64:asym`` on wiki+bbc calib
     4 x 256 tokens, output error from the 16 x 512 statistics windows), uniform INT4 / INT8;
   - mpq's ILP over the main job's full palette (``experiments/configs/smollm2.toml``) at NNCF's
     bits, from the main job's table.

   Bits are mpq's effective bits per decoder weight (codes + fp16 scales + zero-points at the
   code width: NNCF stores exactly these tensors). Quality: ppl ratio to fp32 on the same windows
   with a 95 % CI paired over windows, mean KL(fp || q); per NNCF point, the bits mpq's ILP
   needs for the same held-out ppl (interpolated in log ppl between ILP points) and the paired
   per-window difference of mpq's ILP at NNCF's bits.

Usage::

    python experiments/bench/bench_nncf.py setup
    flock /work/wt/heavy.lock python experiments/bench/bench_nncf.py compress
    flock ... python experiments/bench/bench_nncf.py evaluate --limit-s 540   # repeat until done
    python experiments/bench/bench_nncf.py table

Results: ``--out`` (default ``experiments/results/nncf/results.json``); NNCF's weights and logs
under ``--work`` (default ``$MPQ_CACHE/nncf/bench``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NNCF = "nncf==3.4.0"
TORCH = "torch==2.13.0"
INT4, INT8 = "4:g64:asym", "8:asym"
RATIOS = "1.0,0.8,0.6"
GRID = "4.5,4.75,5.0,5.25,5.5,6.0"
CONFIG = "experiments/configs/smollm2.toml"
SYM_CONFIG = "experiments/configs/smollm2_quality_sym.toml"
Z95 = 1.959963984540054
HERE = Path(__file__).resolve()
UNTIED = f"mpq ilp untied {INT4}/{INT8}"


def _cache() -> Path:
    return Path(os.environ.get("MPQ_CACHE") or Path.home() / ".cache" / "mpq")


# --------------------------------------------------------------------------- NNCF's venv


def setup(venv: Path) -> None:
    """Create NNCF's venv: torch pinned first (the local CPU wheel), then NNCF and the rest."""
    import transformers  # mpq's own version, so both sides load the folder the same way

    py = venv / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run(
        [*pip, TORCH, NNCF, "accelerate", f"transformers=={transformers.__version__}"], check=True
    )
    out = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True)
    pins = [x for x in out.stdout.splitlines() if x.split("=")[0] in ("nncf", "torch", "accelerate",
                                                                      "transformers")]  # fmt: skip
    print("NNCF venv:", venv, *pins, sep="\n  ")


# --------------------------------------------------------------------------- NNCF's worker


def worker(args: argparse.Namespace) -> None:
    """Runs in NNCF's venv (imports no mpq): compress, then save each compressed weight as NNCF's
    own decompressor gives it, with its type and the log."""
    import nncf
    import torch
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseWeightsDecompressor
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    model.config.use_cache = False
    windows = torch.load(args.calib)
    dataset = nncf.Dataset(
        [w for w in windows],
        lambda w: {"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]},
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        compressed = nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode.INT4_ASYM,
            ratio=args.ratio,
            group_size=64,
            dataset=dataset,
            sensitivity_metric=nncf.SensitivityMetric.HESSIAN_INPUT_ACTIVATION,
            subset_size=len(windows),
            backup_mode=nncf.BackupMode.INT8_ASYM,
        )
    seconds = time.perf_counter() - t0
    weights: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for hook_name, hook in get_hook_storage(compressed).named_hooks():
            if not isinstance(hook, BaseWeightsDecompressor):
                continue
            _, op_name, _ = decode_hook_name(hook_name)
            module_name, attr = op_name.rsplit(".", 1)
            stored = getattr(compressed.get_submodule(module_name), attr)
            w = hook(stored).float().contiguous()
            weights[module_name] = w
            zp = getattr(hook, "zero_point_shape", None)
            layers[module_name] = {
                "decompressor": type(hook).__name__,
                "shape": list(w.shape),
                "stored_dtype": str(stored.dtype),
                "stored_numel": int(stored.numel()),
                "scale_shape": list(hook._scale.shape),
                "scale_dtype": str(hook._scale.dtype),
                "zero_point_shape": list(zp) if zp is not None else list(hook._zero_point.shape),
            }
    save_file(weights, str(out / "weights.safetensors"))
    info = {
        "ratio": args.ratio,
        "seconds": seconds,
        "nncf": nncf.__version__,
        "torch": torch.__version__,
        "calib_windows": list(windows.shape),
        "layers": layers,
    }
    (out / "nncf.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"ratio {args.ratio}: {len(layers)} compressed weights, {seconds:.1f} s", flush=True)


# --------------------------------------------------------------------------- mpq side


def _ratio_dir(work: Path, ratio: float) -> Path:
    return work / f"ratio-{ratio:g}"


def compress(args: argparse.Namespace) -> None:
    """Write the calibration windows, then run NNCF's worker once per ratio (cached)."""
    import torch

    from mpq.config import load_config
    from mpq.data import text_windows
    from mpq.models import load_model, models_root

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    py = Path(args.venv) / "bin" / "python"
    if not py.is_file():
        raise SystemExit(f"no NNCF venv at {args.venv}: run `{HERE.name} setup` first")
    loaded = load_model("smollm2-135m")  # converts the bundled GGUF once, if not yet cached
    stats = load_config(args.config).statistics
    assert stats is not None and stats.n is not None and stats.seq_len is not None
    calib = work / "calib.pt"
    windows = text_windows(stats.data[0], stats.split, loaded.tokenizer, stats.seq_len, stats.n)
    torch.save(windows, calib)
    for ratio in _floats(args.ratios):
        out = _ratio_dir(work, ratio)
        if (out / "nncf.json").is_file():
            print(f"ratio {ratio:g}: cached in {out}")
            continue
        out.mkdir(parents=True, exist_ok=True)
        argv = [str(py), str(HERE), "_worker", "--model", str(models_root() /
                "smollm2-135m-fp32"), "--calib", str(calib), "--ratio", str(ratio), "--out",
                str(out), "--threads", str(args.threads)]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        (out / "nncf.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise SystemExit(f"NNCF failed at ratio {ratio} ({proc.returncode}):\n{tail}")
        print(f"ratio {ratio:g}: {time.perf_counter() - t0:.1f} s wall (process)", flush=True)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _nncf_format(layer: dict[str, Any]) -> str:
    """The mpq format of one NNCF decompressor (checked against its scale/zero-point shapes)."""
    rows, cols = layer["shape"]
    kind = layer["decompressor"]
    if kind == "INT4AsymmetricWeightsDecompressor":
        assert layer["scale_shape"] == [rows, cols // 64, 1], layer
        assert layer["zero_point_shape"] == [rows, cols // 64, 1], layer
        return INT4
    if kind == "INT8AsymmetricWeightsDecompressor":
        assert layer["scale_shape"] == [rows, 1] and layer["zero_point_shape"] == [rows, 1], layer
        return INT8
    raise SystemExit(f"unexpected NNCF decompressor {kind}")


def _paired(q: list[float], base: list[float]) -> dict[str, float]:
    """exp(mean(q - base)) over windows and its 95 % CI (paired), with the mean and se of the
    per-window NLL difference."""
    import numpy as np

    d = np.asarray(q, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    m, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
    return {"ratio": math.exp(m), "lo": math.exp(m - Z95 * se), "hi": math.exp(m + Z95 * se),
            "dnll": m, "dnll_se": se}  # fmt: skip


class Results:
    """The results JSON, written after every row (a killed run resumes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.data.setdefault("rows", {})

    @property
    def rows(self) -> dict[str, Any]:
        return self.data["rows"]  # type: ignore[no-any-return]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def _weight_match(model: Any, weights: dict[str, Any], plan: Any) -> dict[str, dict[str, float]]:
    """Per format: how close mpq's RTN of the same format is to NNCF's dequantized weights:
    share of weights on the same code (|diff| < half a step: NNCF dequantizes in fp16
    arithmetic, so equal codes differ by fp16 rounding), the largest |diff| in steps, and
    ||W_nncf - W_mpq|| / ||W_nncf - W|| (0 = identical). Both take min/max over the range
    widened to 0 and an integer zero-point; NNCF rounds codes with the fp32 scale and stores it
    as fp16, mpq rounds the scale to fp16 first (what its kernels compute)."""
    from mpq.quant.quantize import fake_quantize

    acc: dict[str, list[float]] = {}
    for name, fmt in plan.formats.items():
        w = model.get_submodule(name).weight.detach().float()
        n = weights[name].float()
        m = fake_quantize(w, fmt).float()
        rows, cols = w.shape
        g = fmt.group_size or cols
        wg = w.reshape(rows, cols // g, g)
        lo, hi = wg.amin(-1).clamp_max(0), wg.amax(-1).clamp_min(0)
        step = ((hi - lo) / ((1 << fmt.bits) - 1)).clamp_min(1e-12)[..., None]
        diff = ((n - m).reshape(rows, cols // g, g).abs() / step).reshape(-1)
        a = acc.setdefault(fmt.spec(), [0.0, 0.0, 0.0, 0.0, 0.0])
        a[0] += float((diff < 0.5).sum())
        a[1] += diff.numel()
        a[2] = max(a[2], float(diff.max()))
        a[3] += float((n - m).pow(2).sum())
        a[4] += float((n - w).pow(2).sum())
        del wg
    return {k: {"same": v[0] / v[1], "max_steps": v[2], "rel_diff": math.sqrt(v[3] / v[4]),
                "weights": v[1]} for k, v in acc.items()}  # fmt: skip


def _interp_bits(curve: list[tuple[float, float]], target: float) -> float | None:
    """The bits at which the piecewise-linear curve ``[(bits, log ppl)]`` (sorted by bits)
    first reaches ``target`` log ppl; None outside its range."""
    for (b0, y0), (b1, y1) in zip(curve, curve[1:], strict=False):
        if (y0 - target) * (y1 - target) <= 0 and y0 != y1:
            return b0 + (target - y0) * (b1 - b0) / (y1 - y0)
    return None


def evaluate_all(args: argparse.Namespace) -> None:
    import copy

    import torch
    from safetensors.torch import load_file

    from mpq.config import load_config
    from mpq.evaluate import evaluate
    from mpq.formats import QuantFormat
    from mpq.pipeline import Evaluator, damage_table, prepare, solve
    from mpq.plan import BitPlan, uniform_plan

    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "1")))
    t_start = time.perf_counter()
    res = Results(Path(args.out))
    res.data["machine"] = (f"{platform.machine()}, {os.cpu_count()} cpus, no GPU; "
                           f"MPQ_THREADS={os.environ.get('MPQ_THREADS', '1')}")  # fmt: skip
    res.data["command"] = " ".join(sys.argv)
    cfg = load_config(args.config)
    assert cfg.statistics is not None
    prep = prepare("smollm2-135m")  # q/k/v and gate/up tied: how mpq solves
    flat = prepare("smollm2-135m", ties=False)  # one target per Linear: NNCF's choices
    model = flat.loaded.model
    mid = flat.loaded.model_id
    tasks = {d: cfg.evaluation.spec(d).task(flat.loaded) for d in ("wiki", "bbc")}
    evaluators = {d: Evaluator(flat, t, progress=False) for d, t in tasks.items()}
    work = Path(args.work)

    def over() -> bool:
        return args.limit_s is not None and time.perf_counter() - t_start > args.limit_s

    def score(key: str, plan: BitPlan | None, qmodel: Any = None, **extra: Any) -> None:
        """Evaluate one row on both texts (a plan through the caching Evaluator, or a model)."""
        if key in res.rows or over():
            return
        row: dict[str, Any] = dict(extra)
        if plan is not None:
            row["bits"] = flat.cost.plan_cost(plan).effective_bits
            row["formats"] = {f.spec(): sum(1 for g in plan.formats.values() if g == f)
                              for f in set(plan.formats.values())}  # fmt: skip
            row["plan"] = {n: f.spec() for n, f in plan.formats.items()}
        for d, ev in evaluators.items():
            t0 = time.perf_counter()
            if qmodel is None:
                result, _ = ev(plan, label=key)
            else:
                result = evaluate(ev.task, qmodel, ev.reference())
            fp, _ = ev(None)
            row[d] = {
                "ppl": result["ppl"],
                "kl": result["kl"],
                "kl_se": result["kl_se"],
                "nll_units": result.units["nll"],
                **_paired(result.units["nll"], fp.units["nll"]),
                "seconds": time.perf_counter() - t0,
            }
        res.rows[key] = row
        res.save()
        print(key, f"{row.get('bits', float('nan')):.4f} bits",
              *(f"{d} {row[d]['ratio']:.4f} [{row[d]['lo']:.4f}, {row[d]['hi']:.4f}]"
                for d in evaluators), flush=True)  # fmt: skip

    score("fp32", None, bits=32.0)
    # NNCF's own weights, and its per-layer choice as an mpq plan.
    nncf_bits: list[float] = []
    as_is = set(_floats(args.as_is))
    for ratio in _floats(args.ratios):
        folder = _ratio_dir(work, ratio)
        tag = f"nncf@{ratio:g}"
        done = res.data.get("nncf", {}).get(f"{ratio:g}")
        if not (folder / "nncf.json").exists() and done and tag in res.rows:
            nncf_bits.append(done["bits"])  # scored in an earlier run; its weights are gone
            continue
        info = json.loads((folder / "nncf.json").read_text())
        layers = info["layers"]
        plan = BitPlan({t.name: QuantFormat.parse(_nncf_format(layers[t.name]))
                        for t in flat.targets}, mid)  # fmt: skip
        bits = flat.cost.plan_cost(plan).effective_bits
        nncf_bits.append(bits)
        others = sorted(set(layers) - {t.name for t in flat.targets})
        res.data.setdefault("nncf", {})[f"{ratio:g}"] = {
            "seconds": info["seconds"],
            "bits": bits,
            "outside_targets": {n: layers[n]["decompressor"] for n in others},
            "int8_layers": [n for n, f in plan.formats.items() if f.spec() == INT8],
        }
        todo = [k for k in (tag, f"{tag} as mpq plan", f"{tag} as-is") if k not in res.rows]
        if not todo or over():
            continue
        weights = load_file(str(folder / "weights.safetensors"))
        if "match" not in res.data["nncf"][f"{ratio:g}"]:
            res.data["nncf"][f"{ratio:g}"]["match"] = _weight_match(model, weights, plan)
            res.save()
        qmodel = copy.deepcopy(model)
        with torch.no_grad():
            for t in flat.targets:
                qmodel.get_submodule(t.name).weight.copy_(weights[t.name])
        score(tag, plan, qmodel=qmodel, ratio=ratio, source="NNCF weights, embedding/head fp32")
        score(f"{tag} as mpq plan", plan, ratio=ratio, source="mpq RTN of NNCF's choice")
        if ratio in as_is:
            with torch.no_grad():
                for n in others:
                    qmodel.get_submodule(n).weight.copy_(weights[n])
            source = "NNCF's whole model (embedding/head INT8 too); bits: decoder only"
            score(f"{tag} as-is", plan, qmodel=qmodel, ratio=ratio, source=source)
        del qmodel, weights
    # mpq: uniform points and the ILP on the same palette, from the measured table.
    two = [QuantFormat.parse(INT4), QuantFormat.parse(INT8)]
    for fmt in two:
        score(f"uniform {fmt.spec()}", uniform_plan(flat.targets, fmt, mid))
    calib = cfg.calibration.spec().task(prep.loaded, 0)
    stats_task = cfg.statistics.spec().task(prep.loaded, 0)
    # NNCF's bits cut (not rounded) to 4 decimals: mpq never gets more than NNCF used.
    at_nncf = [math.floor(b * 1e4) / 1e4 for b in nncf_bits]
    grid = [b for b in _floats(args.grid) if b not in at_nncf]
    if over():
        return
    tables: dict[str, Any] = {}

    def ilp(budgets: list[float]) -> None:
        # the table only when a row is missing (a resumed run has most of them)
        todo = [b for b in budgets if f"mpq ilp {INT4}/{INT8} @ {b:g}" not in res.rows]
        if todo and "tied" not in tables:
            t0 = time.perf_counter()
            tables["tied"] = damage_table(prep, two, calib, progress=False, anchor=INT4,
                                          stats_task=stats_task)  # fmt: skip
            res.data["table_seconds"] = res.data.get("table_seconds") or time.perf_counter() - t0
            res.data["table"] = f"measured:anchor={INT4}, {cfg.calibration}"
            res.save()
        for b in todo:
            if over():
                return
            plan, sol = solve(prep, "ilp", two, {"bits": b}, tables["tied"])
            score(f"mpq ilp {INT4}/{INT8} @ {b:g}", plan, budget=b, solve_s=sol.wall_time)

    ilp(at_nncf)
    # The full palette at NNCF's bits, from the main job's table; then the symmetric-only
    # palette (the bundled weights sit on a Q4_1 grid that 4:g32:asym:dq nearly reproduces).
    for label, path in (("full palette", args.config), ("symmetric palette", args.sym_config)):
        if all(f"mpq ilp {label} @ {b:.4f}" in res.rows for b in nncf_bits):
            continue
        c = load_config(path)
        assert c.statistics == cfg.statistics and c.calibration == cfg.calibration, path
        est = c.estimators[0]
        assert est.name == "measured", est
        t0 = time.perf_counter()
        anchor = str(dict(est.params)["anchor"])
        full = damage_table(prep, c.formats, calib, progress=False, anchor=anchor,
                            stats_task=stats_task)  # fmt: skip
        res.data.setdefault("tables_seconds", {})[label] = time.perf_counter() - t0
        res.data.setdefault("palettes", {})[label] = [f.spec() for f in c.formats]
        for b in nncf_bits:
            if over():
                return
            plan, sol = solve(prep, "ilp", c.formats, {"bits": b}, full, stats_task=stats_task)
            score(f"mpq ilp {label} @ {b:.4f}", plan, budget=b, solve_s=sol.wall_time)
    ilp(grid)  # more points of mpq's curve, for the bits at equal ppl
    if args.untied and not over():
        # One decision per Linear, as NNCF decides (q/k/v and gate/up apart; the main job's
        # allocation since its fifth session): its own table, at NNCF's bits and on the grid.
        t0 = time.perf_counter()
        flat_calib = cfg.calibration.spec().task(flat.loaded, 0)
        flat_stats = cfg.statistics.spec().task(flat.loaded, 0)
        untied = damage_table(flat, two, flat_calib, progress=False, anchor=INT4,
                              stats_task=flat_stats)  # fmt: skip
        res.data["untied_table_seconds"] = (
            res.data.get("untied_table_seconds") or time.perf_counter() - t0
        )
        for b in [*at_nncf, *grid]:
            if over():
                return
            plan, sol = solve(flat, "ilp", two, {"bits": b}, untied)
            score(f"{UNTIED} @ {b:g}", plan, budget=b, solve_s=sol.wall_time)
    res.data["evaluate_seconds_last_run"] = time.perf_counter() - t_start
    res.save()
    print(markdown(res.data))


# --------------------------------------------------------------------------- report


def _cell(r: dict[str, Any]) -> str:
    return f"{r['ratio']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]"


def _profile(plan: dict[str, str]) -> str:
    """Where a plan puts INT8: layers per role and per third of the 30 blocks."""
    roles: dict[str, int] = {}
    thirds = [0, 0, 0]
    for name, spec in plan.items():
        if spec != INT8:
            continue
        role = name.rsplit(".", 1)[-1].replace("_proj", "")
        roles[role] = roles.get(role, 0) + 1
        thirds[min(int(name.split(".")[2]) // 10, 2)] += 1
    order = ("q", "k", "v", "o", "gate", "up", "down")
    by_role = " ".join(f"{r}:{roles[r]}" for r in order if r in roles)
    return f"{by_role or 'none'}; blocks 0-9/10-19/20-29: {'/'.join(map(str, thirds))}"


def markdown(data: dict[str, Any]) -> str:
    rows = data["rows"]
    lines = [
        "| row | bits / decoder weight | INT8 layers | wiki ppl ratio [95% CI] | bbc ppl ratio "
        "[95% CI] | wiki KL | bbc KL |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    order = sorted(rows, key=lambda k: (rows[k].get("bits", 99), k))
    for k in order:
        r = rows[k]
        n8 = r.get("formats", {}).get(INT8, 0) if "formats" in r else "-"
        lines.append(
            f"| {k} | {r.get('bits', 32):.4f} | {n8} | {_cell(r['wiki'])} | {_cell(r['bbc'])} | "
            f"{r['wiki']['kl']:.4f} | {r['bbc']['kl']:.4f} |"
        )
    untied = {k: r for k, r in rows.items() if k.startswith(UNTIED)}
    lines += ["", "| NNCF ratio | bits | text | NNCF ppl | mpq ILP bits at NNCF's ppl | bits saved "
              "| mpq ILP @ NNCF bits / NNCF, paired [95% CI] | Δnll ± se | full palette @ NNCF "
              "bits / NNCF [95% CI] | symmetric palette @ NNCF bits / NNCF [95% CI] |"
              + (" untied ILP: bits at NNCF's ppl | bits saved | @ NNCF bits / NNCF [95% CI] |"
                 if untied else ""),
              "|---|---:|---|---:|---:|---:|---|---|---|---|"
              + ("---:|---:|---|" if untied else "")]  # fmt: skip
    ilp = {k: r for k, r in rows.items() if k.startswith(f"mpq ilp {INT4}/{INT8}")}
    full = [r for k, r in rows.items() if k.startswith("mpq ilp full palette")]
    sym = [r for k, r in rows.items() if k.startswith("mpq ilp symmetric palette")]
    uni = rows.get(f"uniform {INT4}")
    for ratio in sorted(data.get("nncf", {}), key=lambda x: -float(x)):
        key = f"nncf@{ratio}"
        if key not in rows:
            continue
        r = rows[key]
        for d in ("wiki", "bbc"):
            pts = [(x["bits"], math.log(x[d]["ppl"])) for x in ilp.values()]
            if uni is not None:
                pts.append((uni["bits"], math.log(uni[d]["ppl"])))
            curve = sorted(pts)
            eq = _interp_bits(curve, math.log(r[d]["ppl"]))
            same = min(ilp.values(), key=lambda x: abs(x["bits"] - r["bits"]), default=None)
            pair = "-"
            if same is not None and abs(same["bits"] - r["bits"]) < 0.01:
                p = _paired(same[d]["nll_units"], r[d]["nll_units"])
                pair = f"{p['ratio']:.4f} [{p['lo']:.4f}, {p['hi']:.4f}] | {p['dnll']:+.4f} ± {p['dnll_se']:.4f}"  # noqa: E501
            else:
                pair += " | -"
            saved = "-" if eq is None else f"{r['bits'] - eq:.3f}"
            cells = []
            for group in (full, sym):
                fp = next((x for x in group if abs(x["bits"] - r["bits"]) < 0.01), None)
                cells.append("-" if fp is None else _cell(_paired(fp[d]["nll_units"],
                                                                 r[d]["nll_units"])))  # fmt: skip
            fcell = " | ".join(cells)
            line = (
                f"| {ratio} | {r['bits']:.4f} | {d} | {r[d]['ppl']:.3f} | "
                f"{'-' if eq is None else f'{eq:.3f}'} | {saved} | {pair} | {fcell} |"
            )
            if untied:
                upts = [(x["bits"], math.log(x[d]["ppl"])) for x in untied.values()]
                if uni is not None:
                    upts.append((uni["bits"], math.log(uni[d]["ppl"])))
                ueq = _interp_bits(sorted(upts), math.log(r[d]["ppl"]))
                at = next((x for x in untied.values() if abs(x["bits"] - r["bits"]) < 0.01), None)
                eq_cell = "-" if ueq is None else f"{ueq:.3f} | {r['bits'] - ueq:.3f}"
                if ueq is None:
                    eq_cell += " | -"
                at_cell = (
                    "-" if at is None else _cell(_paired(at[d]["nll_units"], r[d]["nll_units"]))
                )
                line += f" {eq_cell} | {at_cell} |"
            lines.append(line)
    lines += ["", "| plan | bits | INT8 layers by role; by block |", "|---|---:|---|"]
    for k in order:
        r = rows[k]
        mine = k.startswith(("mpq ilp 4", UNTIED))
        if "plan" in r and (k.startswith("nncf@") and "as" not in k or mine):
            lines.append(f"| {k} | {r['bits']:.4f} | {_profile(r['plan'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("command", choices=("setup", "compress", "evaluate", "table", "_worker"))
    ap.add_argument("--venv", default=str(_cache() / "nncf-venv"))
    ap.add_argument("--work", default=str(_cache() / "nncf" / "bench"))
    ap.add_argument("--out", default="experiments/results/nncf/results.json")
    ap.add_argument("--config", default=CONFIG, help="the main job's config (data, full palette)")
    ap.add_argument("--sym-config", default=SYM_CONFIG, help="the symmetric-only palette's")
    ap.add_argument("--ratios", default=RATIOS, help="NNCF ratios (share of INT4 weights)")
    ap.add_argument("--as-is", default="0.6", help="ratios also scored with NNCF's INT8 embedding")
    ap.add_argument("--grid", default=GRID, help="extra ILP budgets (bits) for interpolation")
    ap.add_argument("--limit-s", type=float, default=None, help="stop starting rows after this")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("MPQ_THREADS", "1")))
    ap.add_argument(
        "--untied", action="store_true", help="also the ILP with one decision per Linear"
    )
    # _worker only
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--ratio", type=float)
    args = ap.parse_args()
    if args.command == "setup":
        setup(Path(args.venv))
    elif args.command == "compress":
        compress(args)
    elif args.command == "_worker":
        worker(args)
    elif args.command == "evaluate":
        evaluate_all(args)
    else:
        print(markdown(Results(Path(args.out)).data))


if __name__ == "__main__":
    main()
