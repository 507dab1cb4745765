"""What keys mpq's on-disk caches, and checked cache entries.

A cached result is only reused for the same computation: its key holds a fingerprint of the
weights actually loaded (:func:`weights_fingerprint`: sha256 of every tensor of the state dict,
so new values under the same path give a new key), of the data (:func:`data_fingerprint`), and
:data:`CODE_VERSION` (bumped when a change alters cached numbers).

An entry file is ``{"key": <key digest>, "value": ..., "sha256": <digest of key and value>}``
(:func:`write_entry`): a value that is not finite is refused, and :func:`read_entry` returns
None, with a logged warning, for an entry that is unreadable, written under another key, or
edited by hand; the caller then recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mpq.errors import MpqError

log = logging.getLogger("mpq.cache")

# Bump when a code change alters what a cached evaluation or measurement would contain.
CODE_VERSION = 2


def key_digest(key: Any) -> str:
    """A short digest of a JSON-able key (sorted keys)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _update_tensor(h: Any, name: str, t: Any) -> None:
    import torch

    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        flat = t.cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data)


def tensor_digest(t: Any) -> str:
    """sha256 (first 16 hex digits) of one tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    _update_tensor(h, "", t)
    return h.hexdigest()[:16]


def model_folder(model_id: str) -> str:
    """``model_id`` as one folder name of a cache (path separators replaced)."""
    return model_id.replace("/", "_").replace("\\", "_")


def weights_fingerprint(model: Any) -> str:
    """sha256 (first 16 hex digits) of the names, dtypes, shapes and bytes of every tensor in
    ``model.state_dict()`` (parameters and buffers; a tied tensor once per name). ~0.5 s for
    SmolLM2-135M."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=False).items():
        _update_tensor(h, name, t)
    return h.hexdigest()[:16]


def _rows(batch: Any) -> list[Any] | None:
    """``batch`` split into its rows (dim 0 of every tensor in it), or None when it is not
    a batch of rows (no tensor, or tensors of different lengths)."""
    leaves: list[Any] = []

    def collect(obj: Any) -> None:
        if isinstance(obj, dict):
            for k in sorted(obj):
                collect(obj[k])
        elif isinstance(obj, (tuple, list)):
            for x in obj:
                collect(x)
        elif hasattr(obj, "detach"):
            leaves.append(obj)

    collect(batch)
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in leaves}
    if len(sizes) != 1 or -1 in sizes:
        return None
    (n,) = sizes

    def row(obj: Any, i: int) -> Any:
        if isinstance(obj, dict):
            return {k: row(v, i) for k, v in obj.items()}
        if isinstance(obj, (tuple, list)):
            return type(obj)(row(x, i) for x in obj)
        return obj[i] if hasattr(obj, "detach") else obj

    return [row(batch, i) for i in range(n)]


def data_fingerprint(batches: Iterable[Any], labels: Iterable[Any] | None = None) -> str:
    """sha256 (first 16 hex digits) of a task's input batches (tensors, dicts or tuples of
    tensors) and labels: other tokens, other text or another tokenizer give another key.

    Batches are hashed row by row (the same windows in batches of 1 or of 2 give the same key:
    batching changes results only by float rounding, ~1e-7, and `mpq solve` then reuses the
    table `mpq compare` measured with another batch size)."""
    h = hashlib.sha256()

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k in sorted(obj):
                walk(f"{prefix}.{k}", obj[k])
        elif isinstance(obj, (tuple, list)):
            for i, x in enumerate(obj):
                walk(f"{prefix}[{i}]", x)
        elif hasattr(obj, "detach"):
            _update_tensor(h, prefix, obj)
        else:
            h.update(f"{prefix}={obj!r}|".encode())

    def walk_rows(name: str, items: list[Any]) -> None:
        k = 0
        for batch in items:
            rows = _rows(batch)
            if rows is None:  # not a batch of rows: as it is
                walk(f"{name}<{k}>", batch)
                k += 1
                continue
            for r in rows:
                walk(f"{name}[{k}]", r)
                k += 1

    walk_rows("batches", list(batches))
    if labels is None:
        walk("labels", None)
    else:
        walk_rows("labels", list(labels))
    return h.hexdigest()[:16]


def _finite_tree(obj: Any, allow_nan: Callable[[str], bool], path: str = "") -> str | None:
    """The path of the first non-finite number in ``obj`` (NaN allowed where
    ``allow_nan(path)``), or None."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return None
    if isinstance(obj, (int, float)):
        if math.isfinite(obj) or (math.isnan(obj) and allow_nan(path)):
            return None
        return path or "value"
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = _finite_tree(v, allow_nan, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _finite_tree(v, allow_nan, f"{path}[{i}]")
            if bad:
                return bad
        return None
    return path or "value"  # not JSON data


def non_finite(obj: Any, allow_nan: Callable[[str], bool] = lambda _: False) -> str | None:
    """Where ``obj`` (JSON data) holds a NaN or an infinity (None when it holds none)."""
    return _finite_tree(obj, allow_nan)


def _seal(key: str, value: Any) -> str:
    body = json.dumps(value, sort_keys=True, allow_nan=True)
    return hashlib.sha256(f"{key}|{body}".encode()).hexdigest()


def write_entry(
    path: Path, key: str, value: Any, allow_nan: Callable[[str], bool] = lambda _: False
) -> None:
    """Write one checked entry atomically; MpqError for a value that is not finite (NaN is
    allowed at the paths where ``allow_nan`` says so, e.g. the standard error of one unit)."""
    from mpq.files import atomic_write_text

    bad = non_finite(value, allow_nan)
    if bad is not None:
        raise MpqError(f"refusing to cache a non-finite result ({bad}) in {str(path)!r}")
    entry = {"key": key, "value": value, "sha256": _seal(key, value)}
    atomic_write_text(path, json.dumps(entry))


def read_entry(
    path: Path,
    key: str,
    check: Callable[[Any], str | None] | None = None,
    allow_nan: Callable[[str], bool] = lambda _: False,
) -> Any | None:
    """The value of the entry at ``path`` written under ``key``; None when there is none, and
    None with a logged warning when it is unreadable, of another key, edited (its sha256 does
    not match), not finite, or refused by ``check`` (which returns a reason or None)."""
    if not path.is_file():
        return None
    reason = None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        entry, reason = None, f"unreadable ({exc})"
    if reason is None:
        if not isinstance(entry, dict) or set(entry) != {"key", "value", "sha256"}:
            reason = "not a cache entry (expected key, value, sha256)"
        elif entry["key"] != key:
            reason = "written under another key"
        elif entry["sha256"] != _seal(key, entry["value"]):
            reason = "its content does not match its sha256 (edited or damaged)"
        else:
            bad = non_finite(entry["value"], allow_nan)
            if bad is not None:
                reason = f"non-finite value at {bad}"
            elif check is not None:
                reason = check(entry["value"])
    if reason is not None:
        log.warning("ignoring cache entry %s: %s; recomputing it", path, reason)
        return None
    return entry["value"]
