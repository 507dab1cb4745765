"""`mpq cache`: what the on-disk cache holds, by kind, and clearing a kind."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from mpq.errors import MpqError

#: what each top-level folder of ``$MPQ_CACHE`` holds (ARCHITECTURE.md "Caches")
KINDS = {
    "models": "converted checkpoints (rebuilt from the offline packages on the next load; "
    "$MPQ_MODELS puts them elsewhere)",
    "sensitivity": "sensitivity tables, one file per target",
    "stats": "per-layer input statistics (importance, Hessians)",
    "quant": "quantized weights (capped by $MPQ_QUANT_CACHE_MB)",
    "evals": "evaluated plans' metrics",
    "optuna": "bayes searches' studies",
}


def usage(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder`` (0, 0 when absent)."""
    files = size = 0
    if folder.is_dir():
        for p in folder.rglob("*"):
            if p.is_file():
                files += 1
                size += p.stat().st_size
    return files, size


def cmd_cache(args: argparse.Namespace) -> int:
    from mpq.models import cache_root, models_root
    from mpq.quantstore import cap_bytes

    root, models = cache_root(), models_root()

    def folder(kind: str) -> Path:
        return models if kind == "models" else root / kind

    present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    kinds = list(KINDS) + [k for k in present if k not in KINDS]
    clear = list(dict.fromkeys(args.clear or []))
    if "all" in clear:
        clear = kinds
    unknown = [k for k in clear if k not in kinds]
    if unknown:
        raise MpqError(
            f"--clear {unknown[0]!r} is not a kind of cache; choose from {', '.join(kinds)} or all"
        )
    for kind in clear:
        shutil.rmtree(folder(kind), ignore_errors=True)
    print(f"cache: {root}")
    if models != root / "models":
        print(f"models: {models} ($MPQ_MODELS)")
    print(f"{'kind':<12} {'files':>7} {'MB':>9}  what")
    total = 0
    for kind in kinds:
        files, size = usage(folder(kind))
        total += size
        what = KINDS.get(kind, "")
        if kind == "quant":
            what += f"; cap {cap_bytes() / (1 << 20):.0f} MB"
        mark = "  (cleared)" if kind in clear else ""
        print(f"{kind:<12} {files:>7} {size / (1 << 20):>9.1f}  {what}{mark}")
    print(f"{'total':<12} {'':>7} {total / (1 << 20):>9.1f}")
    return 0


def add_cache_parser(sub: Any) -> None:
    p = sub.add_parser("cache", help="show the on-disk cache by kind; --clear a kind")
    p.add_argument(
        "--clear",
        action="append",
        metavar="KIND",
        help=f"delete one kind of cache ({', '.join(KINDS)}, or all); repeatable. Every entry "
        f"is recomputed when next needed",
    )
    p.set_defaults(func=cmd_cache)
