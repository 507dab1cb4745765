"""Reliability figures for BENCHMARKS.md (issue 13), measured with real `mpq` processes.

    PYTHONPATH=. MPQ_THREADS=1 python experiments/bench/reliability.py > reliability.txt

1. Every bad input of tests/test_bad_inputs.py's table, run as its own `mpq` process: exit
   status, number of `error:` lines, tracebacks, files left in the working folder.
2. Stale cache: `mpq eval` KL before and after rewriting a model folder's weights in place
   (same path, same shapes), against a fresh cache.
3. kill -9 of `mpq export` while it writes; the next export to the same --out.
4. Two `mpq export` to one new --out at once.
5. Two `mpq solve --solver bayes --trials 16` workers on one optuna study.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

CLI = [sys.executable, "-c", "import sys; from mpq.cli import main; sys.exit(main())"]


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], env=env, cwd=cwd, capture_output=True, text=True)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


def bad_inputs(tmp: Path, env: dict[str, str]) -> None:
    import test_bad_inputs as t

    models = t.make_models(tmp / "models")
    rows = []
    for case_id, case, expect in t.CASES:
        work = tmp / "cases" / case_id / "work"
        work.mkdir(parents=True)
        argv = case(models, work)
        before = snapshot(work)
        proc = run(argv, {**env, "MPQ_CACHE": str(work.parent / "cache")}, work)
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        rows.append(
            {
                "case": case_id,
                "rc": proc.returncode,
                "error_lines": len(lines),
                "traceback": "Traceback" in proc.stderr,
                "clear": proc.returncode == 2 and len(lines) == 1 and expect in lines[0],
                "half_written": snapshot(work) != before,
                "message": lines[0] if lines else proc.stderr.strip().splitlines()[-1:],
            }
        )
    print(json.dumps(rows, indent=1))
    n = len(rows)
    print(
        f"BAD INPUTS (Ctrl-C: below): tried {n}; one clear error line "
        f"{sum(r['clear'] for r in rows)}; "
        f"tracebacks {sum(r['traceback'] for r in rows)}; half-written "
        f"{sum(r['half_written'] for r in rows)}; exit codes {sorted({r['rc'] for r in rows})}"
    )


def ctrl_c(tmp: Path, env: dict[str, str]) -> None:
    """SIGINT to `mpq sensitivity` once it has cached its first layers; the rerun resumes."""
    import test_bad_inputs as t

    models = t.make_models(tmp / "ctrl-models")
    work = tmp / "cases" / "ctrl-c"
    work.mkdir(parents=True)
    cache = work / "cache"
    argv = ["sensitivity", "--model", str(models["tiny"]), "--estimator", "measured",
            "--formats", "2,3,4,5,6,8", "--n", "4", "--seq-len", "64", "--out",
            str(work / "t.json")]  # fmt: skip
    e = {**env, "MPQ_CACHE": str(cache)}

    # (a shell's background job ignores SIGINT, and Python keeps an ignored SIGINT ignored)
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([*CLI, *argv], env=e, cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)  # fmt: skip

    def entries() -> list[Path]:
        return [p for p in cache.glob("sensitivity/*/*.json") if p.name != "key.json"]

    while proc.poll() is None and len(entries()) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    kept = len(entries())
    print(f"CTRL-C: exit {proc.returncode}; error lines {lines}; traceback "
          f"{'Traceback' in err}; table written {(work / 't.json').exists()}")  # fmt: skip
    again = run(argv, e, work)
    total = len(entries())
    print(
        f"CTRL-C RESUME: {kept} layers cached when interrupted; the rerun (exit "
        f"{again.returncode}) computed the {total - kept} layers not yet cached, of {total}"
    )


def medium_folder(folder: Path) -> Path:
    """A randomly initialized 8-layer LLaMA (hidden 512, ~60 MB fp32): slow enough to kill."""
    import torch
    from conftest import build_tiny_folder
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = build_tiny_folder(folder.parent / "tok")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, folder / f.name)
    return folder


def stale_cache(tmp: Path, env: dict[str, str]) -> None:
    from conftest import build_tiny_folder
    from safetensors.torch import load_file, save_file

    folder = build_tiny_folder(tmp / "stale" / "model")
    e = {**env, "MPQ_CACHE": str(tmp / "stale" / "cache")}
    argv = ["eval", "--model", str(folder), "--plan", "uniform:3", "--n", "2", "--seq-len", "32"]

    def kl(env_: dict[str, str]) -> float:
        proc = run(argv, env_, tmp)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        return float(json.loads(proc.stdout)["kl"])

    before = kl(e)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v * 3.0 if v.dim() == 2 else v for k, v in tensors.items()},
              folder / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    after = kl(e)
    fresh = kl({**env, "MPQ_CACHE": str(tmp / "stale" / "fresh")})
    print(f"STALE CACHE: KL before {before:.6g}; after rewriting the weights {after:.6g}; "
          f"fresh cache {fresh:.6g}; served stale: {after == before}; equals fresh: "
          f"{after == fresh}")  # fmt: skip


def kill_and_concurrency(tmp: Path, env: dict[str, str]) -> None:
    folder = medium_folder(tmp / "kill" / "model")
    e = {**env, "MPQ_CACHE": str(tmp / "kill" / "cache")}
    out = tmp / "kill" / "exports" / "o"
    out.parent.mkdir(parents=True)
    argv = ["export", "--model", str(folder), "--format", "mpq", "--plan", "uniform:4",
            "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen([*CLI, *argv], env=e, cwd=tmp, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(out.parent.glob(".o.tmp-*/*")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in out.parent.iterdir())
    size = sum(f.stat().st_size for f in out.parent.rglob("*") if f.is_file())
    again = run(argv, e, tmp)
    after = sorted(p.name for p in out.parent.iterdir())
    print(f"KILL -9 EXPORT: left behind {left} ({size:,} bytes); next export exit "
          f"{again.returncode}, folder now {after}")  # fmt: skip
    out2 = tmp / "kill" / "exports" / "p"
    argv2 = [*argv[:-1], str(out2)]
    procs = [subprocess.Popen([*CLI, *argv2], env=e, cwd=tmp, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    res = [p.communicate() + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in res)
    msgs = [line for r in res for line in r[1].splitlines() if line.startswith("error:")]
    print(f"TWO EXPORTS TO ONE NEW --out: exit codes {codes}; refusal: {msgs}")


def bayes_workers(tmp: Path, env: dict[str, str]) -> None:
    import optuna
    from conftest import build_tiny_folder

    folder = build_tiny_folder(tmp / "bayes" / "model")
    db = tmp / "bayes" / "studies.db"
    e = {**env, "MPQ_CACHE": str(tmp / "bayes" / "cache")}
    argv = ["solve", "--model", str(folder), "--solver", "bayes", "--trials", "16",
            "--budget", "bits=5", "--formats", "3,4,6,8", "--storage", str(db),
            "--study", "shared", "--n", "1", "--seq-len", "32", "--no-guard"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*CLI, *argv, "--seed", str(s), "--out", str(tmp / f"b{s}.json")],
            env=e,
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for s in (0, 1)
    ]
    codes = [p.wait() for p in procs]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state.is_finished()]
    choices = [tuple(t.user_attrs["choice"]) for t in done if "choice" in t.user_attrs]
    reused = sum(1 for t in done if "duplicate_of" in t.user_attrs)
    measured = len(choices) - reused
    print(f"TWO BAYES WORKERS (--trials 16 each, one study): exit {codes}; finished trials "
          f"{len(done)}; parameter sets measured {measured}, distinct {len(set(choices))}, "
          f"reused from the study {reused}")  # fmt: skip


def main() -> None:
    """All parts, or those named on the command line (bad, ctrlc, stale, kill, bayes)."""
    parts = {"bad": bad_inputs, "ctrlc": ctrl_c, "stale": stale_cache,
             "kill": kill_and_concurrency, "bayes": bayes_workers}  # fmt: skip
    chosen = sys.argv[1:] or list(parts)
    env = {**os.environ, "MPQ_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in chosen:
            parts[name](tmp, env)


if __name__ == "__main__":
    main()
