"""Per-target on-disk cache, so an interrupted estimator resumes where it stopped.

Entries live in ``<root>/<sha of key>/<target>.json``, one small JSON file each, written
atomically: a kill leaves either a complete entry or none. ``key.json`` records what the key was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mpq.plan import atomic_write_text


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


class TargetCache:
    """One folder of per-target results for one (model, data, estimator, params) key."""

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        self.dir = Path(root) / key_digest(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.exists():
            atomic_write_text(key_file, json.dumps(key, sort_keys=True, indent=1, default=str))

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str) -> Any | None:
        p = self._path(name)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a torn file from another writer: recompute

    def put(self, name: str, value: Any) -> None:
        atomic_write_text(self._path(name), json.dumps(value))
