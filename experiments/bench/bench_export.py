"""Benchmark `mpq export` on SmolLM2-135M: file size against the plan, ppl after reloading.

Two plans, the same for every container so the rows compare: ``uniform:4:g32`` (4-bit,
symmetric, groups of 32, fp16 scales: Q4_0 in GGUF) and an ILP mix of ``4:g32`` / ``8:g32``
at ``bits=5.0`` on a measured-KL damage table (1 calibration window of 64 tokens). Each plan is
exported in every format; the table gives the weight file's size, the tensor bytes it stores
(read back from the file), the plan's predicted bytes (mpq cost model), and held-out wiki ppl
(8 windows of 256 tokens) of the model *reloaded from the written files*:

- mpq / hf: ``mpq.load`` (packed model, reference kernels);
- gguf: every tensor dequantized by ``gguf.quants.dequantize`` (q/k rows un-permuted) into
  the fp model;
- compressed-tensors: every layer decompressed by the compressed-tensors library;
- llamacpp: llama.cpp re-quantizes (not installed here): bytes predicted from GGML type sizes,
  no ppl.

Writes Markdown to stdout (and to ``--out``). ``MPQ_THREADS`` sets torch's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpq.evaluate import evaluate, reference
from mpq.export.command import export as export_plan
from mpq.export.command import exporters
from mpq.export.gguf_writer import GGUF_FILE, _name_map, _row_permutations, gguf_name
from mpq.export.llamacpp import SOURCE
from mpq.formats import QuantFormat
from mpq.pipeline import Prepared, damage_table, prepare, solve, task_for
from mpq.plan import BitPlan, uniform_plan

FORMATS = ("mpq", "hf", "gguf", "llamacpp", "compressed-tensors")
WEIGHT_FILE = {
    "mpq": "model.safetensors",
    "hf": "model.safetensors",
    "gguf": GGUF_FILE,
    "llamacpp": SOURCE,
    "compressed-tensors": "model.safetensors",
}


def _with_weights(prep: Prepared, weights: dict[str, torch.Tensor]) -> nn.Module:
    import copy

    model = copy.deepcopy(prep.loaded.model)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(
                w.reshape(model.get_submodule(name).weight.shape)
            )
    return model


def _gguf_model(prep: Prepared, folder: Path) -> nn.Module:
    import gguf

    reader = gguf.GGUFReader(str(folder / GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    names = _name_map(prep.loaded.model)
    perms = _row_permutations(prep.loaded.model)
    weights = {}
    for t in prep.targets:
        gt = tensors[gguf_name(names, f"{t.name}.weight")]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(gt.data, gt.tensor_type)))
        w = w.reshape(t.shape)
        perm = perms.get(t.name)
        if perm is not None:
            w = w[torch.argsort(perm)]
        weights[t.name] = w.float()
    return _with_weights(prep, weights)


def _ct_model(prep: Prepared, folder: Path) -> nn.Module:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(qc)
    import copy

    shell = copy.deepcopy(prep.loaded.model)
    apply_quantization_config(shell, cfg)
    state = load_file(str(folder / "model.safetensors"))
    weights = {}
    for t in prep.targets:
        scheme = getattr(shell.get_submodule(t.name), "quantization_scheme", None)
        if scheme is None:
            weights[t.name] = state[f"{t.name}.weight"].float()
            continue
        local = {k[len(t.name) + 1 :]: v for k, v in state.items() if k.startswith(t.name + ".")}
        comp = BaseCompressor.get_value_from_registry(scheme.format or cfg.format)
        weights[t.name] = comp.decompress(local, scheme)["weight"].float()
    return _with_weights(prep, weights)


def _reloaded(prep: Prepared, fmt: str, folder: Path) -> nn.Module | None:
    import mpq

    if fmt in ("mpq", "hf"):
        return mpq.load(folder)
    if fmt == "gguf":
        return _gguf_model(prep, folder)
    if fmt == "compressed-tensors":
        return _ct_model(prep, folder)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=8, help="held-out windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=None, help="also write the Markdown here")
    parser.add_argument("--keep", default=None, help="keep the export folders under this path")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "1")))
    t_start = time.perf_counter()
    prep = prepare("smollm2-135m")
    task = task_for(prep, "wiki", "heldout", args.n, args.seq_len, None)
    ref = reference(task, prep.loaded.model)
    fp = evaluate(task, prep.loaded.model, ref)
    mixed_formats = [QuantFormat.parse(s) for s in ("4:g32", "8:g32")]
    t0 = time.perf_counter()
    calib = task_for(prep, "wiki", "calib", 1, 64, None)
    table = damage_table(prep, mixed_formats, calib, progress=False)
    mixed, _ = solve(prep, "ilp", mixed_formats, {"bits": 5.0}, table)
    t_table = time.perf_counter() - t0
    plans: dict[str, BitPlan] = {
        "uniform 4:g32": uniform_plan(prep.targets, QuantFormat.parse("4:g32"), "smollm2-135m"),
        "ilp 4:g32/8:g32 @ bits=5.0": mixed,
    }
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = []
    for label, plan in plans.items():
        cost = prep.cost.plan_cost(plan)
        for fmt in FORMATS:
            folder = root / f"{label.split()[0]}-{fmt}"
            t0 = time.perf_counter()
            report = export_plan(prep, plan, exporters()[fmt], folder, force=True)
            t_write = time.perf_counter() - t0
            model = _reloaded(prep, fmt, folder)
            ppl = float("nan") if model is None else evaluate(task, model, ref)["ppl"]
            file_bytes = (folder / WEIGHT_FILE[fmt]).stat().st_size
            rows.append(
                (label, fmt, cost.effective_bits, cost.total_bytes, report.stored.total_bytes,
                 file_bytes, report.stored.effective_bits, ppl, t_write)
            )  # fmt: skip
            print(rows[-1], flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    lines = [
        f"### Export (`mpq export`) on SmolLM2-135M — {platform.processor() or platform.machine()},"
        f" {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "",
        f"Held-out wiki ppl over {args.n} windows of {args.seq_len} tokens, of the model reloaded "
        f"from the written files; fp32 ppl {fp['ppl']:.3f}. Mixed plan: ILP on a measured-KL table "
        f"(1 window x 64 tokens, {t_table:.0f} s). `predicted` = the plan's total bytes (mpq "
        "cost model); `stored` = tensor bytes read back from the file; `file` = the weight "
        "file's size on disk (llamacpp: the F16 source GGUF; its `stored` is what "
        "llama-quantize will write, from GGML type sizes).",
        "",
        "| plan | format | plan bits/weight | predicted bytes | stored bytes | stored - "
        "predicted | weight file bytes | file - stored | container bits/weight | ppl after "
        "reload | write s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, fmt, bits, pred, stored, fbytes, cbits, ppl, tw in rows:
        ppl_s = "n/a (llama.cpp)" if ppl != ppl else f"{ppl:.3f}"
        lines.append(
            f"| {label} | {fmt} | {bits:.4f} | {pred:,} | {stored:,} | {stored - pred:+,} | "
            f"{fbytes:,} | {fbytes - stored:+,} | {cbits:.4f} | {ppl_s} | {tw:.1f} |"
        )
    lines.append("")
    lines.append(f"Total {time.perf_counter() - t_start:.0f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
