"""A measured latency table: seconds per (layer shape, format, backend, batch) on this machine.

:func:`measure_table` builds each distinct weight shape as a packed module (random weights, the
format, the backend), runs ``warmup`` calls, then times ``repeats`` calls and keeps the median
(CUDA calls are synchronized). Linear layers are timed on an input of ``batch`` rows (1 =
decode); embedding tables on a lookup of ``batch`` ids. The table is JSON, versioned like a
:class:`~mpq.plan.BitPlan`::

    {"_type": "LatencyTable", "_version": 1,
     "_data": {"machine": ..., "device": ..., "torch": ..., "created": ..., "repeats": ...,
               "warmup": ..., "dtype": ..., "entries": [{"kind": "linear", "shape": [r, c],
               "format": "4:g128", "backend": "cpu", "ran": "cpu", "batch": 1,
               "seconds": 1.2e-4}, ...]}}

``ran`` is the backend the layer actually got (``cpu`` falls back to ``reference`` for formats
it cannot fuse). GPTQ formats are timed on RTN codes (same stored layout, same kernels).
``mpq bench-layers`` (:mod:`mpq.cli.bench_cmds`) measures a model's layers into such a file.

:func:`latency_costs` turns a table into the ``[decisions, options]`` cost array of an
allocation problem (same decision order as :func:`mpq.problem.build_problem`): a decision costs
the sum of its members' latencies; a target's aliases (a tied LM head) add the Linear latency of
the same shape. :func:`load_latency_costs` does it from a file, for ``build_problem(...,
latency=...)`` and a ``latency=`` budget in seconds. A missing measurement is an error listing
all of them and the ``mpq bench-layers`` command that measures them. Conv2d targets are not
covered (their cost depends on the input's spatial size, which a
:class:`~mpq.targets.Target` does not carry).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mpq.cost import CostModel
from mpq.envelope import loads, unwrap
from mpq.errors import MpqError
from mpq.formats import QuantFormat, check_format, fits, matrix_shape
from mpq.plan import atomic_write_text
from mpq.targets import Target, decisions

TYPE = "LatencyTable"
VERSION = 1
KINDS = ("linear", "embedding")


@dataclass(frozen=True)
class LatencyEntry:
    kind: str
    shape: tuple[int, int]
    format: str
    backend: str
    batch: int
    seconds: float
    ran: str = ""

    @property
    def key(self) -> tuple[str, tuple[int, int], str, str, int]:
        return (self.kind, self.shape, self.format, self.backend, self.batch)


@dataclass(frozen=True)
class LatencyTable:
    entries: tuple[LatencyEntry, ...]
    machine: str = ""
    device: str = "cpu"
    torch: str = ""
    created: str = ""
    repeats: int = 0
    warmup: int = 0
    dtype: str = "float32"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            raise MpqError("latency table has duplicate (kind, shape, format, backend, batch) rows")
        for e in self.entries:
            if not (np.isfinite(e.seconds) and e.seconds >= 0):
                raise MpqError(f"latency table entry {e.key} has seconds={e.seconds!r}")

    def lookup(
        self, kind: str, shape: tuple[int, int], fmt: str, backend: str, batch: int
    ) -> float:
        """Seconds of one (kind, shape, format spec, backend, batch); KeyError when absent."""
        return self._index[(kind, (int(shape[0]), int(shape[1])), fmt, backend, batch)]

    @cached_property
    def _index(self) -> dict[tuple[str, tuple[int, int], str, str, int], float]:
        return {e.key: e.seconds for e in self.entries}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["entries"] = [{**asdict(e), "shape": list(e.shape)} for e in self.entries]
        data["meta"] = dict(self.meta)
        return {"_type": TYPE, "_version": VERSION, "_data": data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, obj: Any) -> LatencyTable:
        data = dict(unwrap(obj, TYPE, VERSION, "latency table",
                           "measure it again with `mpq bench-layers`"))  # fmt: skip
        try:
            entries = tuple(
                LatencyEntry(
                    kind=str(e["kind"]),
                    shape=(int(e["shape"][0]), int(e["shape"][1])),
                    format=str(e["format"]),
                    backend=str(e["backend"]),
                    batch=int(e["batch"]),
                    seconds=float(e["seconds"]),
                    ran=str(e.get("ran", "")),
                )
                for e in data.pop("entries")
            )
            return cls(entries=entries, **data)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MpqError(f"latency table is malformed: {exc!r}") from None

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        return cls.from_dict(loads(text, "latency table"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a temp file renamed into place)."""
        return atomic_write_text(Path(path), self.to_json())

    def backends(self) -> list[str]:
        """The backends the table has timings for, sorted."""
        return sorted({e.backend for e in self.entries})

    def batches(self) -> list[int]:
        """The batch sizes the table has timings for, sorted."""
        return sorted({e.batch for e in self.entries})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        p = Path(path)
        if not p.is_file():
            raise MpqError(f"latency table {str(p)!r} does not exist; run mpq bench-layers")
        return cls.from_json(p.read_text())


def _module(
    kind: str,
    shape: tuple[int, int],
    fmt: QuantFormat,
    backend: str,
    seed: int,
    device: torch.device,
) -> nn.Module:
    from mpq.kernels.modules import PackedWeight, QuantEmbedding, QuantLinear

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) / shape[1] ** 0.5
    # GPTQ changes the codes, not the stored layout: time the same tensors quantized by RTN.
    packed = PackedWeight(w, replace(fmt, method="rtn")).to(device)
    if kind == "linear":
        return QuantLinear(packed, None, backend=backend, name=f"linear{list(shape)}")
    return QuantEmbedding(packed, nn.Embedding(*shape))


def measure_layer(
    kind: str,
    shape: tuple[int, int],
    fmt: QuantFormat,
    backend: str = "reference",
    batch: int = 1,
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[float, str]:
    """(median seconds per call, backend that ran) of one layer."""
    if kind not in KINDS:
        raise MpqError(f"latency of {kind!r} layers is not measured; kinds: {list(KINDS)}")
    if repeats < 1 or warmup < 0 or batch < 1:
        raise MpqError("repeats and batch must be >= 1 and warmup >= 0")
    check_format(shape, fmt)
    dev = torch.device(device)
    mod = _module(kind, shape, fmt, backend, seed, dev)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "linear":
        x = torch.randn(batch, shape[1], generator=g).to(dev, dtype)
    else:
        x = torch.randint(0, shape[0], (1, batch), generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            mod(x)
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            mod(x)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), str(getattr(mod, "backend", "reference"))


def target_layers(targets: Iterable[Target]) -> list[tuple[str, tuple[int, int]]]:
    """The distinct (kind, [rows, cols]) a set of targets needs timed (aliases as Linear)."""
    out: dict[tuple[str, tuple[int, int]], None] = {}
    for t in targets:
        if t.kind not in KINDS:
            raise MpqError(
                f"{t.name}: latency tables cover linear and embedding targets, not {t.kind}; "
                f"leave {t.kind} layers out with --include / --exclude"
            )
        shape = matrix_shape(t.shape)
        out[(t.kind, shape)] = None
        if t.aliases:
            out[("linear", shape)] = None
    return list(out)


def measure_table(
    layers: Sequence[tuple[str, tuple[int, int]]],
    formats: Sequence[QuantFormat],
    backends: Sequence[str] = ("reference",),
    batches: Sequence[int] = (1,),
    *,
    repeats: int = 20,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> LatencyTable:
    """Time every (layer, format, backend, batch); formats that do not fit a shape are skipped.

    ``progress``: a tqdm bar over the timings (on stderr). ``meta`` is stored in the table next to
    the thread count.
    """
    jobs = [
        (kind, (int(shape[0]), int(shape[1])), fmt, backend, batch)
        for kind, shape in layers
        for fmt in formats
        if fits(shape, fmt)
        for backend in backends
        for batch in batches
    ]
    entries = []
    with tqdm(jobs, desc="bench layers", unit="timing", disable=not progress) as bar:
        for kind, shape, fmt, backend, batch in bar:
            bar.set_postfix_str(f"{kind} {list(shape)} {fmt.spec()} {backend} b{batch}")
            sec, ran = measure_layer(
                kind,
                shape,
                fmt,
                backend,
                batch,
                repeats=repeats,
                warmup=warmup,
                device=device,
                dtype=dtype,
            )
            entries.append(LatencyEntry(kind, shape, fmt.spec(), backend, batch, sec, ran))
    dev = torch.device(device)
    return LatencyTable(
        entries=tuple(entries),
        machine=platform.processor() or platform.machine(),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        torch=torch.__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        repeats=repeats,
        warmup=warmup,
        dtype=str(dtype).removeprefix("torch."),
        meta={"threads": torch.get_num_threads(), **(meta or {})},
    )


def measure_targets(
    targets: Iterable[Target],
    formats: Sequence[QuantFormat],
    backends: Sequence[str] = ("reference",),
    batches: Sequence[int] = (1,),
    **kwargs: Any,
) -> LatencyTable:
    """:func:`measure_table` over the layers ``targets`` need (what ``mpq bench-layers`` runs)."""
    return measure_table(target_layers(targets), formats, backends, batches, **kwargs)


def latency_costs(
    table: LatencyTable,
    targets: CostModel | Sequence[Target],
    formats: Sequence[QuantFormat],
    *,
    backend: str,
    batch: int = 1,
    source: str = "",
) -> np.ndarray:
    """Seconds per ``[decision, option]``, in :func:`mpq.problem.build_problem`'s order.

    Options whose format does not fit a member get 0 (build_problem disallows them). Missing
    measurements for formats that fit are one error listing them all and the ``mpq
    bench-layers`` command that measures them (``source``: the table's file, for that command).
    """
    model_id = targets.model_id if isinstance(targets, CostModel) else "MODEL"
    tlist = list(targets.targets if isinstance(targets, CostModel) else targets)
    groups = decisions(tlist)
    out = np.zeros((len(groups), len(formats)))
    missing: dict[tuple[str, tuple[int, int], str], None] = {}
    for d, members in enumerate(groups.values()):
        for o, fmt in enumerate(formats):
            if not all(fits(t.shape, fmt) for t in members):
                continue
            for t in members:
                shape = matrix_shape(t.shape)
                for kind in [t.kind] + ["linear"] * len(t.aliases):
                    try:
                        out[d, o] += table.lookup(kind, shape, fmt.spec(), backend, batch)
                    except KeyError:
                        missing[(kind, shape, fmt.spec())] = None
    if missing:
        raise MpqError(
            _missing_message(table, list(missing), formats, backend, batch, model_id, source)
        )
    return out


def _missing_message(
    table: LatencyTable,
    missing: list[tuple[str, tuple[int, int], str]],
    formats: Sequence[QuantFormat],
    backend: str,
    batch: int,
    model_id: str,
    source: str,
) -> str:
    """The error for measurements a problem needs and a table lacks: what, and how to get them."""
    where = f" {source}" if source else ""
    listed = ", ".join(f"{k} {list(s)} at {f}" for k, s, f in missing)
    notes = []
    if backend not in table.backends():
        notes.append(f"it has no timings on backend {backend!r} (only {table.backends()})")
    if batch not in table.batches():
        notes.append(f"no timings at batch {batch} (only {table.batches()})")
    lacking = sorted({f for _, _, f in missing}, key=[f.spec() for f in formats].index)
    every = ",".join(f.spec() for f in formats)
    return (
        f"latency table{where} lacks {len(missing)} measurement(s) on backend {backend!r} at "
        f"batch {batch} that the problem needs: {listed}"
        + (f"; {'; '.join(notes)}" if notes else "")
        + f". Formats missing: {','.join(lacking)}. Rerun `mpq bench-layers --model {model_id} "
        f"--formats {every} --backend {backend} --batch {batch} --out {source or 'TABLE.json'}` "
        f"(a table holds what one run measured, so list every candidate format)"
    )


def load_latency_costs(
    path: str | os.PathLike[str],
    cost_model: CostModel,
    formats: Sequence[QuantFormat],
    backend: str,
    batch: int = 1,
) -> np.ndarray:
    """The ``latency=`` argument of :func:`mpq.problem.build_problem` from a table file.

    Reads the :class:`LatencyTable` written by ``mpq bench-layers`` and returns seconds per
    ``[decision, format]`` for ``cost_model``'s targets on ``backend`` at ``batch`` (what
    ``mpq solve --latency-table FILE --latency-backend B --latency-batch N`` passes). Errors
    (:class:`MpqError`): no such file, not a table, ``backend`` not a concrete backend name,
    and every (layer, format) the problem needs that the table lacks, with the command that
    measures them.
    """
    from mpq.kernels.backends import BACKENDS

    table = LatencyTable.load(path)
    if backend not in BACKENDS:
        raise MpqError(
            f"latency backend {backend!r} is not a backend a table records; use one this table "
            f"has: {table.backends()} (bench-layers stores 'auto' as the backend it chose)"
        )
    if batch < 1:
        raise MpqError(f"latency batch {batch} must be >= 1; the table has {table.batches()}")
    return latency_costs(table, cost_model, formats, backend=backend, batch=batch, source=str(path))
