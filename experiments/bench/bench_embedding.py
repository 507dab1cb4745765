"""The tied embedding / LM head as a target on SmolLM2-135M: whole-file size and quality.

Every decoder Linear layer (210) at one format (default ``4:g32:mse``, importance from the
calibration splits), the tied embedding/head (49152 x 576, 21 % of the weights) at each of
``--embedding`` (``fp32`` = left out of the plan, stored as the fp32 tensor; otherwise an mpq
format, mse formats weighted by the head's input importance, :mod:`mpq.layerstats`).

Per row:

- bytes: the mpq container's tensor bytes (:mod:`mpq.cost`) and, where every format has a GGUF
  type, the GGUF file written by mpq's exporter (tensor bytes checked equal to the prediction;
  file bytes include metadata and the tokenizer, like llama.cpp's figures); bits per weight over
  ALL weights of the model (every tensor's bits over every value);
- quality by mpq's evaluator: held-out ppl ratio to the fp32 model on wiki and bbc
  (``--n`` windows x 512 tokens each, 95% CI paired over windows, as bench_quantizers.py);
- quality by llama.cpp (``--llama``): the GGUF file scored by ``llama-perplexity
  --kl-divergence`` against the F32 logits bench_llamacpp.py saved in
  ``$MPQ_CACHE/llamacpp/<version>/bench`` (the same tokens as its llama.cpp rows: Q4_0 +
  imatrix, IQ4_XS + imatrix), ratio +- 1.96 x its paired uncertainty.

Importance (``mean x^2`` per input column) comes from the calibration splits only
(``--calib wiki:16,bbc:8``), cached under $MPQ_CACHE/stats. Rows are appended to ``--out``
(JSON lines; a killed run resumes); ``--table`` prints the Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_llamacpp import file_info, llamacpp_home, perplexity_vs_base
from bench_quantizers import _ratio

from mpq.cost import build_cost_model
from mpq.evaluate import evaluate, reference
from mpq.executor import apply_plan, data_targets
from mpq.export.command import exporters
from mpq.export.common import ExportInput
from mpq.formats import QuantFormat
from mpq.layerstats import InputStats, cached_input_stats, merge_stats
from mpq.models import cache_root, sample_input
from mpq.pipeline import Prepared, prepare, task_for
from mpq.plan import BitPlan
from mpq.targets import discover

EMBED = "model.embed_tokens"


def _stats(prep: Prepared, calib: str) -> dict[str, InputStats]:
    names = [t.name for t in prep.targets if t.kind == "linear" or t.name == EMBED]
    parts = []
    for item in calib.split(","):
        data, n = item.split(":")
        task = task_for(prep, data, "calib", int(n), 512, None)
        parts.append(
            cached_input_stats(
                prep.loaded.model,
                names,
                task,
                model_id=prep.loaded.model_id,
                cache_root=cache_root() / "stats",
            )  # fmt: skip
        )
    return merge_stats(parts)


def _given(plan: BitPlan, prep: Prepared, stats: dict[str, InputStats]) -> dict[str, InputStats]:
    names, _ = data_targets(plan, prep.targets)
    return {n: stats[n] for n in names}


def _fake(model: torch.nn.Module, packed: torch.nn.Module, targets: list[Any]) -> Any:
    """A copy of ``model`` whose ``targets`` hold ``packed``'s dequantized weights (what
    ``apply_plan(mode="fake")`` computes, without quantizing twice)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in targets:
            w = out.get_submodule(t.name).weight
            w.copy_(packed.get_submodule(t.name).packed.dequantize().to(w.dtype))
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(int(os.environ.get("MPQ_THREADS", "1")))
    full = prepare("smollm2-135m", exclude=())  # 211 targets: the tied embedding/head included
    model = full.loaded.model
    dec_targets = discover(model, (), full.loaded.default_exclude)
    dec = Prepared(
        full.loaded, dec_targets,
        build_cost_model(model, dec_targets, full.loaded.model_id, sample_input(full.loaded)),
    )  # fmt: skip
    assert len(full.targets) == len(dec_targets) + 1 and full.targets[0].name == EMBED
    out = Path(args.out)
    lines = out.read_text().splitlines() if out.is_file() else []
    done = {json.loads(x)["embedding"] for x in lines}
    t0 = time.perf_counter()
    stats = _stats(full, args.calib)
    print(f"statistics: {time.perf_counter() - t0:.1f} s", flush=True)
    evals = {}
    for data in ("wiki", "bbc"):
        task = task_for(full, data, "heldout", args.n, 512, None)
        ref = reference(task, model)
        evals[data] = (task, ref, evaluate(task, model, ref))
    dfmt = QuantFormat.parse(args.decoder)
    dec_plan = BitPlan({t.name: dfmt for t in dec_targets}, full.loaded.model_id)
    t0 = time.perf_counter()
    packed_dec = apply_plan(model, dec_plan, dec_targets, stats=_given(dec_plan, dec, stats))
    fake_dec = _fake(model, packed_dec, dec_targets)
    print(f"decoder quantized: {time.perf_counter() - t0:.1f} s", flush=True)
    gguf = exporters()["gguf"]
    bench = llamacpp_home() / "bench"
    for emb in args.embedding.split(","):
        if emb in done:
            continue
        row: dict[str, Any] = {"decoder": args.decoder, "embedding": emb}
        if emb == "fp32":
            prep, plan, fake, packed = dec, dec_plan, fake_dec, packed_dec
        else:
            efmt = QuantFormat.parse(emb)
            prep = full
            plan = BitPlan({**{EMBED: efmt}, **dict(dec_plan.formats)}, full.loaded.model_id)
            one = BitPlan({EMBED: efmt}, full.loaded.model_id)
            st = {EMBED: stats[EMBED]} if efmt.method == "mse" else {}
            packed = apply_plan(packed_dec, one, full.targets[:1], stats=st)
            fake = _fake(fake_dec, packed, full.targets[:1])
        cost = prep.cost.plan_cost(plan)
        row["mpq_bytes"] = cost.total_bytes
        row["bpw_all_mpq"] = cost.model_bits
        row["bits_decoder"] = dec.cost.plan_cost(dec_plan).effective_bits
        for data, (task, ref, fp) in evals.items():
            row[data] = _ratio(evaluate(task, fake, ref), fp)
        if not gguf.check(plan, prep.targets, model):
            predicted = gguf.predict(plan, prep.cost).total_bytes
            inp = ExportInput(model, packed, plan, prep.targets, full.loaded.model_id, prep.cost,
                              full.loaded.tokenizer)  # fmt: skip
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                gguf.write(inp, Path(tmp))
                stored = gguf.measure(Path(tmp), inp)
                assert stored.total_bytes == predicted, (stored.total_bytes, predicted)
                info = file_info(Path(tmp) / "model.gguf")
                row["gguf"] = {"predicted": predicted, "file_bytes": info.file_bytes,
                               "bpw_all": info.bpw_all, "types": info.types}  # fmt: skip
                if args.llama:
                    for data in ("wiki", "bbc"):
                        s = perplexity_vs_base(
                            llamacpp_home() / "bin", Path(tmp) / "model.gguf",
                            bench / f"base-{data}.kld", args.threads,
                            Path(args.work) / f"llama-{emb}-{data}.log",
                        )  # fmt: skip
                        row["gguf"][f"llama_{data}"] = {
                            "ratio": s.ratio,
                            "ci": 1.96 * s.ratio_se,
                            "kld": s.kld,
                        }
        del fake, packed
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def table(path: Path) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    print(
        "| decoder | embedding/head | mpq file (tensor) bytes | bpw (all) | GGUF file bytes | "
        "GGUF bpw (all) | mpq evaluator wiki [95% CI] | bbc [95% CI] | llama-perplexity wiki | "
        "bbc |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|---|---|")
    for r in rows:
        w, b = r["wiki"], r["bbc"]
        g = r.get("gguf")
        gb = f"{g['file_bytes']:,}" if g else "no GGUF type"
        gbits = f"{g['bpw_all']:.3f}" if g else "-"
        lw = lb = "-"
        if g and "llama_wiki" in g:
            lw = f"{g['llama_wiki']['ratio']:.4f} ± {g['llama_wiki']['ci']:.4f}"
            lb = f"{g['llama_bbc']['ratio']:.4f} ± {g['llama_bbc']['ci']:.4f}"
        print(
            f"| `{r['decoder']}` | `{r['embedding']}` | {r['mpq_bytes']:,} | "
            f"{r['bpw_all_mpq']:.3f} | {gb} | {gbits} | {w['ratio']:.3f} [{w['lo']:.3f}, "
            f"{w['hi']:.3f}] | {b['ratio']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}] | {lw} | {lb} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8, help="held-out windows of 512 tokens per text")
    ap.add_argument("--calib", default="wiki:16,bbc:8", help="calibration data:windows, ...")
    ap.add_argument("--decoder", default="4:g32:mse", help="format of every decoder Linear")
    ap.add_argument("--embedding", default="fp32,8:g32,6:g32:mse,5:g32:mse,4:g32:mse",
                    help="formats of the tied embedding/head (fp32: not a target)")  # fmt: skip
    ap.add_argument("--llama", action="store_true", help="also score GGUF files by llama.cpp")
    ap.add_argument("--threads", type=int, default=1, help="llama-perplexity threads")
    ap.add_argument("--work", default=tempfile.gettempdir(), help="folder for GGUF files, logs")
    ap.add_argument("--out", default="bench_embedding.jsonl")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args()
    if args.table:
        table(Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
