"""Per-target on-disk cache, so an interrupted estimator resumes where it stopped.

Entries live in ``<root>/<digest of key>/<target>.json``, one small checked JSON file each
(:func:`mpq.cache.write_entry`: the key's digest, the value and a sha256 of both), written
atomically: a kill leaves either a complete entry or none. ``key.json`` records what the key
was. An entry that is unreadable, of another key, edited, non-finite or refused by the reader's
check is logged and recomputed (:func:`mpq.cache.read_entry`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpq.cache import key_digest, read_entry, write_entry
from mpq.files import atomic_write_text

__all__ = ["TargetCache", "key_digest"]


class TargetCache:
    """One folder of per-target results for one (model, weights, data, estimator, params) key."""

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        self.key = key_digest(key)
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.exists():
            atomic_write_text(key_file, json.dumps(key, sort_keys=True, indent=1, default=str))

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str, check: Callable[[Any], str | None] | None = None) -> Any | None:
        """The entry of ``name``; None when missing or bad (a bad one is logged)."""
        return read_entry(self._path(name), self.key, check)

    def put(self, name: str, value: Any) -> None:
        """Store ``value`` (JSON data, finite numbers only: MpqError otherwise)."""
        write_entry(self._path(name), self.key, value)
