"""Quantized weights kept on disk between runs, so a format is quantized once per machine.

The sensitivity table quantizes every (target, format) it scores; the evaluator, the guard and
``mpq solve`` at a new budget quantize the same weights again to run the plans. A
:class:`QuantStore` is the ``memo`` of :func:`mpq.executor.apply_plan` (and the table's
per-target memo, :meth:`QuantStore.view`) written through to
``$MPQ_CACHE/quant/<model>/<weights key>/<entry>.safetensors``.

Keys: the folder holds one model's weights (:func:`mpq.cache.weights_fingerprint`: sha256 of
every tensor), quantizer code (``QUANT_VERSION``), mpq and torch versions; an entry holds one
target, one format spec and, for ``mse`` formats (the only ones whose result depends on input
statistics), the sha256 of the target's importance (``InputStats.diag``). GPTQ results are not
stored (they depend on the rest of the plan when run sequentially) and keep formats (None)
stay in memory.

Entries are safetensors files: codes of at most 4 bits packed two to a byte, the structure
(shape, format, double-quant scales, row/column-mix parts) in the metadata, and a sha256 over
all of it that is checked on read; an unreadable, foreign or edited entry is logged and
recomputed. Writes are atomic (temporary file, then rename). The cache is capped at
``$MPQ_QUANT_CACHE_MB`` megabytes (default 4096; ``0`` keeps quantized weights in memory only),
least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpq.cache import tensor_digest
from mpq.errors import MpqError
from mpq.files import atomic_write
from mpq.formats import QuantFormat
from mpq.layerstats import InputStats
from mpq.quant.core import QUANT_VERSION, DoubleQuant, QuantizedTensor

log = logging.getLogger("mpq.quantstore")

ENV_CAP = "MPQ_QUANT_CACHE_MB"
DEFAULT_CAP_MB = 4096
_SUFFIX = ".safetensors"

Key = tuple[str, str]
Value = QuantizedTensor | None


def cap_bytes() -> int:
    """The cache's size limit in bytes from ``$MPQ_QUANT_CACHE_MB`` (0: no disk store)."""
    raw = os.environ.get(ENV_CAP, "").strip()
    if not raw:
        return DEFAULT_CAP_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise MpqError(
            f"${ENV_CAP}={raw!r} is not a size: give megabytes (e.g. {DEFAULT_CAP_MB}), or 0 to "
            f"keep quantized weights in memory only"
        )
    return int(mb * (1 << 20))


# --- (de)serialization: a QuantizedTensor as flat tensors and a JSON tree ---------------------


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes < 16 two to a byte (low nibble first); an odd count gets a zero pad."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8)
    out[0::2] = packed & 15
    out[1::2] = packed >> 4
    return out[:numel]


def _put(tensors: dict[str, torch.Tensor], path: str, t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu().contiguous()
    packed = (
        path.endswith("codes") and t.dtype == torch.uint8 and t.numel() > 1 and int(t.max()) < 16
    )
    tensors[path] = _pack(t) if packed else t
    return {"shape": list(t.shape), "packed": bool(packed)}


def _get(tensors: Mapping[str, torch.Tensor], path: str, info: Any) -> torch.Tensor:
    t = tensors[path]
    shape = [int(s) for s in info["shape"]]
    if info["packed"]:
        t = _unpack(t, math.prod(shape))
    return t.reshape(shape)


def _flatten(qt: QuantizedTensor, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tree: dict[str, Any] = {"shape": list(qt.shape), "fmt": qt.fmt.to_dict()}
    tree["codes"] = _put(tensors, prefix + "codes", qt.codes)
    tree["scales"] = _put(tensors, prefix + "scales", qt.scales)
    if qt.zeros is not None:
        tree["zeros"] = _put(tensors, prefix + "zeros", qt.zeros)
    if qt.dq is not None:
        dq: dict[str, Any] = {}
        for name in ("super_scales", "scale_codes", "super_mins", "min_codes"):
            got = getattr(qt.dq, name)
            if got is not None:
                dq[name] = _put(tensors, f"{prefix}dq.{name}", got)
        tree["dq"] = dq
    if qt.parts is not None:
        tree["parts"] = {
            "high": _flatten(qt.parts.high, prefix + "parts.high.", tensors),
            "mask": _put(tensors, prefix + "parts.mask", qt.parts.mask),
        }
    return tree


def _rebuild(tree: Any, prefix: str, tensors: Mapping[str, torch.Tensor]) -> QuantizedTensor:
    dq = None
    if "dq" in tree:
        d = tree["dq"]
        got = {k: _get(tensors, f"{prefix}dq.{k}", d[k]) for k in d}
        dq = DoubleQuant(
            super_scales=got["super_scales"],
            scale_codes=got["scale_codes"],
            super_mins=got.get("super_mins"),
            min_codes=got.get("min_codes"),
        )
    parts = None
    if "parts" in tree:
        from mpq.quant.rowmix import RowParts

        parts = RowParts(
            high=_rebuild(tree["parts"]["high"], prefix + "parts.high.", tensors),
            mask=_get(tensors, prefix + "parts.mask", tree["parts"]["mask"]),
        )
    return QuantizedTensor(
        codes=_get(tensors, prefix + "codes", tree["codes"]),
        scales=_get(tensors, prefix + "scales", tree["scales"]),
        zeros=_get(tensors, prefix + "zeros", tree["zeros"]) if "zeros" in tree else None,
        shape=tuple(int(s) for s in tree["shape"]),
        fmt=QuantFormat.from_dict(tree["fmt"]),
        dq=dq,
        parts=parts,
    )


def _seal(entry: str, tree_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(f"{entry}|{tree_json}|".encode())
    for name in sorted(tensors):
        h.update(f"{name}|{tensor_digest(tensors[name])}|".encode())
    return h.hexdigest()


def write_entry(path: Path, entry: str, qt: QuantizedTensor) -> int:
    """Write ``qt`` to ``path`` atomically under the key ``entry``; its size in bytes."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree_json = json.dumps(_flatten(qt, "", tensors), sort_keys=True)
    meta = {"entry": entry, "tree": tree_json, "sha256": _seal(entry, tree_json, tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path.stat().st_size


def read_entry(path: Path, entry: str) -> QuantizedTensor | None:
    """The entry at ``path`` if it is readable, written under ``entry`` and intact, else None
    (logged, unless the file is simply absent)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        if meta.get("entry") != entry:
            raise ValueError("written under another key")
        if meta.get("sha256") != _seal(entry, meta.get("tree", ""), tensors):
            raise ValueError("its checksum does not match (edited or damaged)")
        qt = _rebuild(json.loads(meta["tree"]), "", tensors)
    except FileNotFoundError:  # evicted by another process meanwhile
        return None
    except Exception as e:  # noqa: BLE001 (any unreadable entry is recomputed)
        log.warning("quantized-weight cache entry %s is unusable (%s); recomputing it", path, e)
        return None
    os.utime(path)  # recently used: evicted last
    return qt


# --- the store ---------------------------------------------------------------------------------


def _entries(root: Path) -> list[tuple[float, int, Path]]:
    out = []
    for p in root.rglob(f"*{_SUFFIX}"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append((st.st_mtime, st.st_size, p))
    return out


def evict(root: Path, cap: int) -> int:
    """Delete the least recently used entries under ``root`` until they total at most ``cap``
    bytes; the bytes left."""
    found = sorted(_entries(root))
    total = sum(size for _, size, _ in found)
    for _, size, p in found:
        if total <= cap:
            break
        p.unlink(missing_ok=True)
        total -= size
    return total


@dataclass
class QuantStore(MutableMapping[Key, Value]):
    """Quantized weights of one model by (target, format spec), for one set of input
    statistics; in memory (``keep``) and written through to ``folder`` (None: memory only)."""

    folder: Path | None
    stats: Mapping[str, InputStats] = field(default_factory=dict)
    cap: int = DEFAULT_CAP_MB << 20
    keep: bool = True
    _mem: dict[Key, Value] = field(default_factory=dict, init=False, repr=False)
    _imp: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _used: int | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(
        cls,
        root: Path,
        model_id: str,
        weights: str,
        stats: Mapping[str, InputStats] | None = None,
        *,
        keep: bool = True,
    ) -> QuantStore:
        """The store of the model ``model_id`` whose weights fingerprint is ``weights``
        (:func:`mpq.cache.weights_fingerprint`) under ``root`` (``$MPQ_CACHE/quant``)."""
        from mpq import __version__
        from mpq.cache import key_digest, model_folder

        cap = cap_bytes()
        if cap <= 0:
            return cls(None, stats or {}, 0, keep)
        key = {"weights": weights, "quant": QUANT_VERSION, "mpq": __version__,
               "torch": torch.__version__}  # fmt: skip
        return cls(root / model_folder(model_id) / key_digest(key), stats or {}, cap, keep)

    def entry(self, key: Key) -> str:
        """What an entry depends on besides the folder's key: target, format, importance."""
        name, spec = key
        imp = ""
        if QuantFormat.parse(spec).method == "mse":
            st = self.stats.get(name)
            if st is not None:
                if name not in self._imp:
                    self._imp[name] = tensor_digest(st.diag)
                imp = self._imp[name]
        return f"{name}|{spec}|{imp}"

    def _path(self, key: Key) -> Path:
        assert self.folder is not None
        digest = hashlib.sha256(self.entry(key).encode()).hexdigest()[:24]
        return self.folder / f"{digest}{_SUFFIX}"

    def _load(self, key: Key) -> QuantizedTensor | None:
        if self.folder is None:
            return None
        return read_entry(self._path(key), self.entry(key))

    def __getitem__(self, key: Key) -> Value:
        if key in self._mem:
            return self._mem[key]
        got = self._load(key)
        if got is None:
            raise KeyError(key)
        if self.keep:
            self._mem[key] = got
        return got

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        try:
            self[(str(key[0]), str(key[1]))]
        except KeyError:
            return False
        return True

    def __setitem__(self, key: Key, value: Value) -> None:
        if value is not None and self.folder is not None and value.fmt.method != "gptq":
            self._write(key, value, self.folder)
        if self.keep or value is None:
            self._mem[key] = value
        else:
            self._mem.pop(key, None)

    def _write(self, key: Key, value: QuantizedTensor, folder: Path) -> None:
        """Write one entry, then evict down to the cap; an unwritable cache turns the disk off
        for this store (a full or read-only cache costs time, never the run)."""
        try:
            size = write_entry(self._path(key), self.entry(key), value)
        except (OSError, MpqError) as e:  # MpqError: atomic_write found no writable folder
            log.warning(
                "cannot write the quantized-weight cache under %s (%s); keeping quantized "
                "weights in memory only (set $%s=0 to skip the disk)", folder, e, ENV_CAP,
            )  # fmt: skip
            self.folder = None
            return
        root = folder.parent.parent
        self._used = (
            sum(s for _, s, _ in _entries(root)) if self._used is None else self._used + size
        )
        if self._used > self.cap:
            self._used = evict(root, self.cap)

    def __delitem__(self, key: Key) -> None:
        self._mem.pop(key, None)
        if self.folder is not None:
            self._path(key).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._mem))

    def __len__(self) -> int:
        return len(self._mem)

    def view(self, name: str) -> TargetView:
        """This store's entries of one target by format spec (a memo the caller drops)."""
        return TargetView(self, name)


@dataclass
class TargetView(MutableMapping[str, QuantizedTensor]):
    """One target's quantized formats by spec: held while the caller holds the view, read
    from and written through to the store."""

    store: QuantStore
    name: str
    _mem: dict[str, QuantizedTensor] = field(default_factory=dict, init=False, repr=False)

    def __getitem__(self, spec: str) -> QuantizedTensor:
        if spec not in self._mem:
            got = self.store._load((self.name, spec))
            if got is None:
                raise KeyError(spec)
            self._mem[spec] = got
        return self._mem[spec]

    def __contains__(self, spec: object) -> bool:
        try:
            self[str(spec)]
        except KeyError:
            return False
        return True

    def __setitem__(self, spec: str, value: QuantizedTensor) -> None:
        self._mem[spec] = value
        self.store[(self.name, spec)] = value

    def __delitem__(self, spec: str) -> None:
        self._mem.pop(spec, None)
        del self.store[(self.name, spec)]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._mem))

    def __len__(self) -> int:
        return len(self._mem)
