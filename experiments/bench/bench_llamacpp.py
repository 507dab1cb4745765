"""llama.cpp side by side: its own quantizers and its own perplexity tool against mpq's exports.

1. **Build once, cache.** ``llama-quantize``, ``llama-imatrix`` and ``llama-perplexity`` are
   built (CPU only, ``-DGGML_NATIVE=OFF`` with AVX2/FMA/F16C, static, ``-j2``) from the
   llama.cpp tree vendored in the PyPI sdist of ``llama-cpp-python`` (``pip download
   --no-binary :all: --no-deps llama-cpp-python==VERSION``) and cached under
   ``$MPQ_CACHE/llamacpp/<VERSION>/bin`` (``src/`` keeps the convert script and ``gguf-py``).
   About 10-40 minutes on 2 shared cores, once. Never part of ``make test``.
2. **F32 GGUF** of mpq's cached fp32 SmolLM2 folder (``$MPQ_CACHE/models/smollm2-135m-fp32``)
   by llama.cpp's own ``convert_hf_to_gguf.py --outtype f32``.
3. **Texts.** ``calib.txt`` = mpq's wiki calibration split; ``wiki.txt`` / ``bbc.txt`` = the
   held-out splits (documents joined by a blank line, cut after enough tokens for ``--chunks``
   windows). Nothing held-out reaches the imatrix.
4. **llama.cpp's quants**: ``llama-imatrix`` on ``calib.txt`` (``-c 512``), then
   ``llama-quantize`` to Q4_0, Q4_K_M, IQ4_XS, Q3_K_S with and without the imatrix (stock
   settings: llama.cpp also quantizes ``token_embd``), and Q4_0 with ``token_embd`` kept F32 (the
   like-for-like row for mpq's plans, which keep the embedding fp32).
5. **mpq's exports**: ``mpq export --format gguf`` of ``uniform 4:g32`` (Q4_0 blocks, mpq's RTN
   codes written bit-exact) and, with ``--mixed-bits``, an ILP plan over GGUF-mappable formats;
   ``mpq export --format llamacpp`` (F16 source + ``--tensor-type`` overrides) of ``uniform
   4:g32:asym`` run for real through the generated ``llama-quantize.sh``.
6. **Scores**: every file by ``llama-perplexity --kl-divergence`` against the F32 GGUF's logits
   on the same ``-c 512`` chunks of each held-out text (all ``--chunks``): PPL(Q)/PPL(base) with
   the uncertainty llama-perplexity prints (paired over tokens; shown as a 95 % CI = 1.96 x
   that), and mean KLD. **Real-client check**: the F32 file and mpq's GGUF exports (and
   llama.cpp's Q4_0) are also loaded by ``transformers`` from the GGUF file and scored by mpq's
   own evaluator on exactly the tokens llama-perplexity used (read from its base logits file:
   chunks of 512, llama's BOS rule, predictions at positions 256..510), ratio to the F32 file
   with a 95 % CI paired over chunks.

Every file's bytes and bits per weight (whole model, and the decoder blocks' 2-D weights) are
recorded. Writes ``--out`` (JSON) and prints a Markdown section for BENCHMARKS.md.

Usage: ``MPQ_THREADS=2 python experiments/bench/bench_llamacpp.py --out
experiments/results/llamacpp/results.json`` (``make bench-llamacpp``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpq.models import cache_root, models_root

VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DGGML_OPENMP=ON",
)
LLAMA_TYPES = ("Q4_0", "Q4_K_M", "IQ4_XS", "Q3_K_S")
Z95 = 1.959963984540054


# --------------------------------------------------------------------------- build


def _run(
    argv: list[str],
    log: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a command; its stdout+stderr go to ``log`` (and are returned); raise on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    out = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(f"$ {' '.join(argv)}\n{out}\n[{time.perf_counter() - t0:.1f} s]\n")
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-30:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}\n{tail}")
    return out


def _cached(argv: list[str], out: Path, log: Path) -> None:
    """Run ``argv`` unless ``out`` and its log (written when the run finished) exist."""
    if out.is_file() and log.is_file():
        return
    _run(argv, log)


def llamacpp_home(version: str = VERSION) -> Path:
    return cache_root() / "llamacpp" / version


def build(version: str = VERSION, work: Path | None = None) -> Path:
    """The cached bin folder with the three tools, building them first when absent."""
    home = llamacpp_home(version)
    bin_dir = home / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS) and (home / "src").is_dir():
        return bin_dir
    work = work or Path(tempfile.mkdtemp(prefix="llamacpp-build-"))
    work.mkdir(parents=True, exist_ok=True)
    tree = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not tree.is_dir():
        sdist = work / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    f"llama-cpp-python=={version}",
                    "-d",
                    str(work),
                ]
            )
        with tarfile.open(sdist) as tf:
            tf.extractall(work, filter="data")
    build_dir = work / "build"
    if not (build_dir / "build.ninja").is_file():
        _run(["cmake", "-S", str(tree), "-B", str(build_dir), "-G", "Ninja", *CMAKE_FLAGS])
    _run(["nice", "-n", "10", "cmake", "--build", str(build_dir), "-j2", "--target", *TOOLS])
    staging = Path(tempfile.mkdtemp(dir=home.parent if home.parent.exists() else None))
    (staging / "bin").mkdir()
    for t in TOOLS:
        shutil.copy2(build_dir / "bin" / t, staging / "bin" / t)
    (staging / "src").mkdir()
    shutil.copy2(tree / "convert_hf_to_gguf.py", staging / "src")
    for sub in ("conversion", "gguf-py"):
        if (tree / sub).is_dir():
            shutil.copytree(tree / sub, staging / "src" / sub)
    home.parent.mkdir(parents=True, exist_ok=True)
    if home.exists():
        shutil.rmtree(home)
    os.replace(staging, home)
    return bin_dir


# --------------------------------------------------------------------------- files


@dataclass
class FileInfo:
    """One GGUF file: bytes on disk, tensor bytes, bits per weight (whole model and the decoder
    blocks' 2-D weights) and the count of tensors per GGML type."""

    path: str
    file_bytes: int
    tensor_bytes: int
    bpw_all: float
    bpw_blocks: float
    types: dict[str, int]


def file_info(path: Path) -> FileInfo:
    import gguf

    reader = gguf.GGUFReader(str(path))
    nbytes = nel = bb = be = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        nbytes += int(t.n_bytes)
        nel += int(t.n_elements)
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bb += int(t.n_bytes)
            be += int(t.n_elements)
    return FileInfo(
        str(path), path.stat().st_size, nbytes, nbytes * 8 / nel, bb * 8 / max(be, 1), types
    )


def write_texts(tokenizer: Any, out: Path, chunks: int, ctx: int) -> dict[str, Path]:
    """calib.txt (all of wiki calib) and the held-out wiki/bbc texts, each cut after the
    document that brings it past ``chunks * ctx`` tokens (plus a margin)."""
    from mpq.data import load_documents

    paths = {}
    for name, data_id, split in (
        ("calib", "wiki", "calib"),
        ("wiki", "wiki", "heldout"),
        ("bbc", "bbc", "heldout"),
    ):
        docs = load_documents(data_id, split)
        texts: list[str] = []
        need = None if name == "calib" else chunks * ctx + 4 * ctx
        count = 0
        for d in docs:
            texts.append(d.text.strip())
            count += len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) + 2
            if need is not None and count >= need:
                break
        p = out / f"{name}.txt"
        p.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        paths[name] = p
    return paths


# --------------------------------------------------------------------------- llama.cpp runs


@dataclass
class LlamaScore:
    """One ``llama-perplexity --kl-divergence`` run against the F32 base."""

    ppl: float
    ppl_se: float
    ppl_base: float
    ratio: float
    ratio_se: float
    kld: float
    kld_se: float
    chunks: int
    seconds: float


_NUM = r"([-+]?(?:nan|inf|[0-9][-+0-9.eE]*))"  # llama-perplexity prints -nan for a zero spread


def _grab(pattern: str, text: str) -> tuple[float, float]:
    m = re.search(pattern + r"\s*:\s*" + _NUM + r"\s*±\s*" + _NUM, text)
    if m is None:
        raise SystemExit(f"could not find {pattern!r} in llama-perplexity's output")
    return float(m.group(1)), float(m.group(2))


def perplexity_base(
    bin_dir: Path, f32: Path, text: Path, base: Path, chunks: int, ctx: int, threads: int, log: Path
) -> tuple[float, float]:
    """The F32 run that saves its logits (and the tokens) to ``base``; its PPL and SE."""
    out = _run(
        [
            str(bin_dir / "llama-perplexity"),
            "-m",
            str(f32),
            "-f",
            str(text),
            "-c",
            str(ctx),
            "-b",
            str(ctx),
            "--chunks",
            str(chunks),
            "-t",
            str(threads),
            "--kl-divergence-base",
            str(base),
        ],
        log,
    )
    m = re.search(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM, out)
    if m is None:
        raise SystemExit(f"no final estimate in {log}")
    return float(m.group(1)), float(m.group(2))


def perplexity_vs_base(
    bin_dir: Path, model: Path, base: Path, threads: int, log: Path
) -> LlamaScore:
    t0 = time.perf_counter()
    out = _run(
        [
            str(bin_dir / "llama-perplexity"),
            "-m",
            str(model),
            "--kl-divergence-base",
            str(base),
            "--kl-divergence",
            "-t",
            str(threads),
        ],
        log,
    )
    ppl, ppl_se = _grab(r"Mean PPL\(Q\)", out)
    ppl_base, _ = _grab(r"Mean PPL\(base\)", out)
    ratio, ratio_se = _grab(r"Mean PPL\(Q\)/PPL\(base\)", out)
    kld, kld_se = _grab(r"Mean\s+KLD", out)
    header = np.fromfile(base, dtype=np.int32, count=5, offset=0)
    return LlamaScore(
        ppl,
        ppl_se,
        ppl_base,
        ratio,
        ratio_se,
        kld,
        kld_se,
        int(header[4]),
        time.perf_counter() - t0,
    )


def base_tokens(base: Path) -> np.ndarray:
    """The ``[chunks, ctx]`` tokens llama-perplexity scored (its base logits file's header:
    ``_logits_``, n_ctx, n_vocab, n_chunk, tokens)."""
    raw = base.open("rb").read(20)
    assert raw[:8] == b"_logits_", f"{base} is not a llama-perplexity logits file"
    ctx, _vocab, chunks = np.frombuffer(raw[8:20], dtype=np.int32)
    toks = np.fromfile(base, dtype=np.int32, count=int(chunks * ctx), offset=20)
    return toks.reshape(int(chunks), int(ctx))


# --------------------------------------------------------------------------- mpq's evaluator


def gguf_add_bos(path: Path) -> tuple[bool, int]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    f = reader.fields
    bos = int(f["tokenizer.ggml.bos_token_id"].parts[-1][0])
    add = f.get("tokenizer.ggml.add_bos_token")
    return (bool(add.parts[-1][0]) if add is not None else False), bos


def load_gguf_model(path: Path) -> torch.nn.Module:
    """The model in a GGUF file, dequantized by transformers (gguf's numpy dequantizers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


@torch.no_grad()
def mpq_nll(model: torch.nn.Module, tokens: np.ndarray, add_bos: bool, bos: int) -> np.ndarray:
    """Per-chunk mean NLL on llama-perplexity's positions, by mpq's evaluator (``batch_stats``):
    BOS replaces token 0 when the vocab adds one; predictions at positions ``ctx/2 .. ctx-2``."""
    from mpq.evaluate import batch_stats

    ids = torch.from_numpy(tokens.astype(np.int64))
    if add_bos:
        ids[:, 0] = bos
    first = ids.shape[1] // 2
    labels = torch.from_numpy(tokens.astype(np.int64))[:, first + 1 :]
    out = []
    for i in range(ids.shape[0]):
        logits = model(input_ids=ids[i : i + 1]).logits[:, first:-1].float()
        out.append(float(batch_stats(logits, logits, labels[i : i + 1]).nll[0]))  # type: ignore[index]
    return np.array(out)


def paired_ratio(nll: np.ndarray, nll_base: np.ndarray) -> tuple[float, float, float]:
    """PPL ratio ``exp(mean(nll - nll_base))`` and its 95 % CI, paired over chunks."""
    d = nll - nll_base
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    m = float(d.mean())
    return math.exp(m), math.exp(m - Z95 * se), math.exp(m + Z95 * se)


# --------------------------------------------------------------------------- main


@dataclass
class Row:
    name: str
    source: str  # llama.cpp | mpq gguf | mpq llamacpp
    info: FileInfo
    scores: dict[str, LlamaScore] = field(default_factory=dict)
    mpq_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _mpq_exports(root: Path, bin_dir: Path, mixed_bits: float | None, log_dir: Path) -> list[Row]:
    from mpq.export.command import export, exporters, solve_for_container
    from mpq.formats import QuantFormat
    from mpq.pipeline import damage_table, prepare, task_for
    from mpq.plan import uniform_plan

    prep = prepare("smollm2-135m")
    rows = []
    plan = uniform_plan(prep.targets, QuantFormat.parse("4:g32"), prep.loaded.model_id)
    rep = export(prep, plan, exporters()["gguf"], root / "mpq-gguf-4g32", force=True)
    path = root / "mpq-gguf-4g32" / "model.gguf"
    rows.append(
        Row(
            "mpq uniform 4:g32 (RTN) -> gguf",
            "mpq gguf",
            file_info(path),
            notes=[f"predicted {rep.predicted_bytes} B, stored {rep.stored.total_bytes} B"],
        )
    )
    if mixed_bits is not None:
        formats = [QuantFormat.parse(s) for s in ("4:g32", "4:g32:asym", "5:g32", "8:g32")]
        calib = task_for(prep, "wiki", "calib", 4, 512, None)
        table = damage_table(prep, formats, calib, progress=False)
        budget = {"bits": mixed_bits}  # bits per target weight in the GGUF container
        mixed = solve_for_container(prep, exporters()["gguf"], "ilp", formats, budget, table)
        rep = export(prep, mixed, exporters()["gguf"], root / "mpq-gguf-mixed", force=True)
        path = root / "mpq-gguf-mixed" / "model.gguf"
        rows.append(
            Row(
                f"mpq ilp 4:g32/4:g32:asym/5:g32/8:g32 @ {mixed_bits} bits -> gguf",
                "mpq gguf",
                file_info(path),
                notes=["ILP in the GGUF container on a measured-KL table (4 x 512 wiki calib)"],
            )
        )
    # The llamacpp export, run for real.
    plan = uniform_plan(prep.targets, QuantFormat.parse("4:g32:asym"), prep.loaded.model_id)
    folder = root / "mpq-llamacpp-4"
    rep = export(prep, plan, exporters()["llamacpp"], folder, force=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    _run(["sh", "llama-quantize.sh"], log_dir / "mpq-llamacpp-quantize.log", env=env, cwd=folder)
    path = folder / "model-mpq.gguf"
    info = file_info(path)
    predicted = rep.stored.total_bytes
    rows.append(
        Row(
            "mpq uniform 4-bit plan -> llamacpp export (overrides + llama-quantize)",
            "mpq llamacpp",
            info,
            notes=[
                f"export predicted {predicted} tensor bytes; llama-quantize wrote "
                f"{info.tensor_bytes} ({info.tensor_bytes - predicted:+d})"
            ],
        )
    )
    return rows


native_models: dict[str, torch.nn.Module] = {}


def _mpq_native(specs: list[str]) -> list[Row]:
    """mpq-only formats (no GGUF type on SmolLM2's rows: ``:dq`` with the shorter last
    super-block): the packed model's plan, scored by mpq's evaluator only; bytes from the cost
    model (``bpw (blocks)`` = bits per target weight: every decoder-block Linear)."""
    from mpq.executor import apply_plan
    from mpq.formats import QuantFormat
    from mpq.pipeline import prepare
    from mpq.plan import uniform_plan

    if not specs:
        return []
    prep = prepare("smollm2-135m")
    rows = []
    for spec in specs:
        plan = uniform_plan(prep.targets, QuantFormat.parse(spec), prep.loaded.model_id)
        cost = prep.cost.plan_cost(plan)
        name = f"mpq uniform {spec} (RTN; mpq container)"
        native_models[name] = apply_plan(prep.loaded.model, plan, prep.targets, mode="fake")
        info = FileInfo(
            "", cost.total_bytes, cost.total_bytes, cost.model_bits, cost.effective_bits, {}
        )
        rows.append(Row(name, "mpq", info, notes=["not a GGUF file: mpq's evaluator only"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", default=VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--work", default=None, help="build folder (reused when present)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--root", default=None, help="folder for the GGUF files and logs")
    parser.add_argument("--chunks", type=int, default=32, help="512-token chunks per text")
    parser.add_argument("--types", default=",".join(LLAMA_TYPES), help="llama.cpp types")
    parser.add_argument("--texts", default="wiki,bbc", help="held-out texts, in this order")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--imatrix-chunks", type=int, default=64)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("MPQ_THREADS", "2")))
    parser.add_argument(
        "--mixed-bits",
        type=float,
        default=None,
        help="also export an ILP plan at this many bits per weight",
    )
    parser.add_argument("--no-mpq-eval", action="store_true", help="skip the real-client check")
    parser.add_argument(
        "--native",
        default="4:g32,4:g32:asym,4:g32:dq,4:g32:asym:dq",
        help="mpq-only uniform formats scored by mpq's evaluator",
    )
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    bin_dir = build(args.version, Path(args.work) if args.work else None)
    print(f"llama.cpp tools: {bin_dir}", flush=True)
    if args.build_only:
        return
    from mpq.models import load_model

    root = Path(args.root) if args.root else llamacpp_home(args.version) / "bench"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    hf = models_root() / "smollm2-135m-fp32"
    texts = write_texts(loaded.tokenizer, root, args.chunks, args.ctx)
    f32 = root / "f32.gguf"
    if not f32.is_file():
        src = bin_dir.parent / "src"
        _run(
            [
                sys.executable,
                str(src / "convert_hf_to_gguf.py"),
                str(hf),
                "--outtype",
                "f32",
                "--outfile",
                str(f32),
            ],
            logs / "convert.log",
            env=dict(os.environ, PYTHONPATH=str(src / "gguf-py")),
        )
    imatrix = root / "imatrix.gguf"
    t0 = time.perf_counter()
    _cached(
        [
            str(bin_dir / "llama-imatrix"),
            "-m",
            str(f32),
            "-f",
            str(texts["calib"]),
            "-c",
            str(args.ctx),
            "--chunks",
            str(args.imatrix_chunks),
            "-t",
            str(args.threads),
            "-o",
            str(imatrix),
            "--no-ppl",
        ],
        imatrix,
        logs / "imatrix.log",
    )
    t_imatrix = time.perf_counter() - t0
    rows = [Row("F32 (convert_hf_to_gguf.py)", "llama.cpp", file_info(f32))]
    for qt in args.types.split(","):
        for use_im in (False, True):
            name = f"{qt}{' + imatrix' if use_im else ''}"
            path = root / f"llama-{qt}{'-imatrix' if use_im else ''}.gguf"
            argv = [str(bin_dir / "llama-quantize")]
            if use_im:
                argv += ["--imatrix", str(imatrix)]
            _cached(
                [*argv, str(f32), str(path), qt, str(args.threads)],
                path,
                logs / f"quantize-{path.stem}.log",
            )
            rows.append(Row(name, "llama.cpp", file_info(path)))
    for use_im in (False, True):
        path = root / f"llama-Q4_0-embdf32{'-imatrix' if use_im else ''}.gguf"
        argv = [str(bin_dir / "llama-quantize"), "--token-embedding-type", "f32"]
        if use_im:
            argv += ["--imatrix", str(imatrix)]
        _cached(
            [*argv, str(f32), str(path), "Q4_0", str(args.threads)],
            path,
            logs / f"quantize-{path.stem}.log",
        )
        rows.append(
            Row(
                f"Q4_0{' + imatrix' if use_im else ''}, token_embd F32",
                "llama.cpp",
                file_info(path),
            )
        )
    rows += _mpq_exports(root, bin_dir, args.mixed_bits, logs)
    base_ppl: dict[str, tuple[float, float]] = {}
    native: list[Row] = []

    def dump() -> dict[str, Any]:
        """Write what is measured so far (a killed run keeps its finished rows)."""
        result = {
            "paired_ratio_ci": "mpq_eval ratio_lo/hi: 95 % CI paired over chunks",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
            "llama_cpp_python": args.version,
            "chunks": args.chunks,
            "ctx": args.ctx,
            "imatrix_chunks": args.imatrix_chunks,
            "imatrix_seconds": t_imatrix,
            "base_ppl": base_ppl,
            "rows": [asdict(r) for r in [*rows, *native]],
            "seconds": time.perf_counter() - t_start,
            "command": " ".join(sys.argv),
        }
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return result

    native += _mpq_native(args.native.split(",") if args.native else [])
    checked = [r for r in rows if r.source == "mpq gguf" or r.name in ("Q4_0", rows[0].name)]
    add_bos, bos = gguf_add_bos(f32)
    for text in args.texts.split(","):
        base = root / f"base-{text}.kld"
        base_ppl[text] = perplexity_base(
            bin_dir,
            f32,
            texts[text],
            base,
            args.chunks,
            args.ctx,
            args.threads,
            logs / f"ppl-base-{text}.log",
        )
        for row in rows:
            path = Path(row.info.path)
            row.scores[text] = perplexity_vs_base(
                bin_dir, path, base, args.threads, logs / f"ppl-{path.stem}-{text}.log"
            )
            print(text, row.name, asdict(row.scores[text]), flush=True)
            dump()
        if args.no_mpq_eval:
            continue
        # The real-client check: the same files (and mpq-only plans) by mpq's evaluator.
        toks = base_tokens(base)
        nll_base = mpq_nll(load_gguf_model(f32), toks, add_bos, bos)
        for row in [*checked, *native]:
            model = native_models.get(row.name) or load_gguf_model(Path(row.info.path))
            nll = mpq_nll(model, toks, add_bos, bos)
            ratio, lo, hi = paired_ratio(nll, nll_base)
            row.mpq_eval[text] = {
                "ppl": float(np.exp(nll.mean())),
                "ppl_base": float(np.exp(nll_base.mean())),
                "ratio": ratio,
                "ratio_lo": lo,
                "ratio_hi": hi,
                "add_bos": add_bos,
            }
            print(text, row.name, row.mpq_eval[text], flush=True)
            dump()
    result = dump()
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| file | source | file bytes | bpw (all) | bpw (blocks) | wiki PPL(Q)/PPL(F32) ± 95% "
        "| bbc PPL(Q)/PPL(F32) ± 95% | wiki KLD | bbc KLD | mpq evaluator wiki / bbc ratio "
        "[95% CI] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        s = r["scores"]
        m = r["mpq_eval"]
        llama = [
            f"{s[t]['ratio']:.4f} ± {Z95 * s[t]['ratio_se']:.4f}" if t in s else "-"
            for t in ("wiki", "bbc")
        ]
        kld = [f"{s[t]['kld']:.4f}" if t in s else "-" for t in ("wiki", "bbc")]
        me = " / ".join(
            f"{m[t]['ratio']:.4f} [{m[t]['ratio_lo']:.4f}, {m[t]['ratio_hi']:.4f}]"
            for t in ("wiki", "bbc")
            if t in m
        )
        lines.append(
            f"| {r['name']} | {r['source']} | {r['info']['file_bytes']:,} | "
            f"{r['info']['bpw_all']:.3f} | {r['info']['bpw_blocks']:.3f} | "
            + " | ".join(llama)
            + " | "
            + " | ".join(kld)
            + f" | {me or '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
