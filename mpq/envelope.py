"""The versioned JSON envelope every mpq file uses: ``{"_type", "_version", "_data"}``.

Plans, sensitivity tables, latency tables and export manifests are written as
``{"_type": KIND, "_version": N, "_data": {...}}``; :func:`unwrap` checks the first two and
returns the third, or raises one :class:`~mpq.errors.MpqError` that names the problem and the
fix (``fix``: how to make a file this mpq reads).
"""

from __future__ import annotations

import json
from typing import Any

from mpq.errors import MpqError


def loads(text: str, what: str) -> Any:
    """``json.loads(text)``; malformed JSON is an MpqError naming ``what`` was being read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MpqError(f"{what} is not valid JSON ({exc}); the file is malformed") from None


def wrap(kind: str, version: int, data: dict[str, Any]) -> dict[str, Any]:
    return {"_type": kind, "_version": version, "_data": data}


def unwrap(obj: Any, kind: str, version: int, what: str, fix: str) -> dict[str, Any]:
    """``obj["_data"]`` when ``obj`` is a ``kind`` envelope of ``version``; else MpqError."""
    if not isinstance(obj, dict) or obj.get("_type") != kind:
        raise MpqError(f'not a {what}: expected a JSON object with "_type": "{kind}"; {fix}')
    if obj.get("_version") != version:
        raise MpqError(
            f"{what} version {obj.get('_version')!r} is not supported (this mpq reads version "
            f"{version}); {fix}"
        )
    data = obj.get("_data")
    if not isinstance(data, dict):
        raise MpqError(f'{what} has no "_data" object; the file is malformed: {fix}')
    return data
