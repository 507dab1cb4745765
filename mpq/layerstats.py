"""Second moments of the targets' inputs from one calibration pass, cached on disk.

For a Linear layer with inputs ``x [rows, cols]`` over all calibration tokens:

- ``diag[j] = mean(x_j^2)``: the layer's **importance** per input column (llama.cpp's
  imatrix), which weights the ``mse`` method's error;
- ``full = mean(x x^T)``: the Hessian of ``||x W^T - x Q^T||^2`` up to a factor 2, which
  GPTQ needs. Only collected for the names asked for (``full=``), since it is
  ``cols^2`` float64 values per layer.

Layers that read the same input tensor one after another (q/k/v, gate/up) share its sums.

A tied embedding / LM head (one target: an ``Embedding`` whose weight a ``Linear`` head also
reads) takes its statistics from the **head side**: the head's input is the final hidden state,
so ``diag`` is its ``mean(x^2)`` per column of the shared ``[vocab, dim]`` tensor. The lookup has
no input to weigh: its natural importance is per row (how often a token is looked up), and a
per-row weight does not change any group's best scale (groups lie within rows), so the head's
per-column importance is the only statistic that changes the ``mse`` search. An embedding with no
Linear sharing its weight gets no statistics (unweighted ``mse``; :func:`weighted_by_input`).
:func:`cached_input_stats` stores each layer's statistics as a safetensors file under
``<cache_root>/<key>/``, key = model id, a fingerprint of its weights, the calibration task's key
and :data:`STATS_VERSION`; a rerun reads them instead of running the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.files import atomic_write
from mpq.models import run_batch
from mpq.targets import Target

STATS_VERSION = 2


@dataclass(frozen=True)
class InputStats:
    """``diag [cols]`` and (when collected) ``full [cols, cols]`` float64 second moments of one
    layer's inputs, over ``rows`` input rows (tokens)."""

    diag: torch.Tensor
    full: torch.Tensor | None
    rows: int


def weighted_by_input(target: Target) -> bool:
    """Whether ``target`` has input statistics: a Linear layer, or an embedding tied to a head
    (it has aliases; :func:`stats_module` finds the Linear among them)."""
    return target.kind == "linear" or (target.kind == "embedding" and bool(target.aliases))


def stats_module(model: nn.Module, name: str) -> nn.Linear:
    """The Linear module whose inputs give target ``name``'s statistics: the module itself, or
    for an Embedding the Linear that reads the same weight tensor (a tied LM head)."""
    m = model.get_submodule(name)
    if isinstance(m, nn.Linear):
        return m
    if isinstance(m, nn.Embedding):
        for other in model.modules():
            if isinstance(other, nn.Linear) and other.weight is m.weight:
                return other
        raise MpqError(
            f"{name}: an embedding without a tied Linear head has no input to weigh its error "
            f"by; input statistics are collected for Linear layers and tied embeddings (give "
            f"it an rtn format, or mse without statistics)"
        )
    raise MpqError(
        f"{name}: input statistics are collected for Linear layers, this is a {type(m).__name__}"
    )


class InputSums:
    """Running sums of the inputs of the Linear modules ``names`` (a tied embedding: its head's,
    :func:`stats_module`; ``full``: also ``x x^T``),
    fed by :meth:`hooks` (forward pre-hooks) or :meth:`add`. Layers that read the same input
    tensor one after another (q/k/v, gate/up) share one computation of its sums."""

    def __init__(self, names: Sequence[str], full: Collection[str] = ()) -> None:
        unknown = set(full) - set(names)
        if unknown:
            raise MpqError(
                f"full statistics asked for {sorted(unknown)[:3]}, which are not in names"
            )
        self.names = list(names)
        self.full = set(full)
        self._diag: dict[str, torch.Tensor] = {}
        self._outer: dict[str, torch.Tensor] = {}
        self._counts = dict.fromkeys(self.names, 0)
        # The last input seen (kept alive) and its sums.
        self._last: list[Any] = [None, None, None]

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add the rows of ``x [..., cols]`` to ``name``'s sums."""
        x = x.detach()
        last = self._last
        if last[0] is not x or (name in self.full and last[2] is None):
            x2 = x.reshape(-1, x.shape[-1]).float()
            # One batch's x^T x in float32 (BLAS speed), accumulated over batches in float64.
            outer_sum = (x2.T @ x2).double() if name in self.full else None
            last[:] = [x, x2.double().pow(2).sum(0), outer_sum]
        d, h = last[1], last[2]
        self._diag[name] = self._diag[name] + d if name in self._diag else d.clone()
        if name in self.full:
            assert h is not None
            self._outer[name] = self._outer[name] + h if name in self._outer else h.clone()
        self._counts[name] += x.numel() // x.shape[-1]

    def hooks(self, model: nn.Module) -> list[Any]:
        """Forward pre-hooks on the modules ``names`` of ``model`` feeding :meth:`add` (the
        caller removes them)."""
        handles = []
        try:
            for n in self.names:
                m = stats_module(model, n)
                handles.append(
                    m.register_forward_pre_hook(lambda mod, inp, n=n: self.add(n, inp[0]))
                )
        except MpqError:
            for h in handles:
                h.remove()
            raise
        return handles

    def result(self) -> dict[str, InputStats]:
        """The means so far; every name must have seen inputs."""
        self._last[:] = [None, None, None]
        missing = [n for n in self.names if self._counts[n] == 0]
        if missing:
            raise MpqError(f"the calibration pass never reached {missing[:3]}; check the inputs")
        return {
            n: InputStats(
                diag=self._diag[n] / self._counts[n],
                full=self._outer[n] / self._counts[n] if n in self._outer else None,
                rows=self._counts[n],
            )
            for n in self.names
        }


def collect_input_stats(
    model: nn.Module,
    names: Sequence[str],
    calib: Iterable[Any],
    *,
    full: Collection[str] = (),
    progress: bool = False,
) -> dict[str, InputStats]:
    """Statistics of the Linear modules ``names`` (a tied embedding: its head's, see
    :func:`stats_module`) from one forward pass per calibration batch (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs; a :class:`mpq.tasks.Task` gives its
    ``batches``). ``full``: names that also get ``x x^T``; ``progress``: a tqdm bar over the
    batches."""
    from tqdm.auto import tqdm

    batches = getattr(calib, "batches", calib)
    sums = InputSums(names, full)
    hooks = sums.hooks(model)
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="input statistics", unit="batch", leave=False,
                              disable=not progress):  # fmt: skip
                run_batch(model, batch)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise MpqError("the calibration data has no batches; input statistics need inputs")
    return sums.result()


def stats_key(model_id: str, fingerprint: str, task_key: str) -> str:
    """The cache folder name of one model's statistics on one calibration task."""
    body = json.dumps(
        {"v": STATS_VERSION, "model": model_id, "weights": fingerprint, "task": task_key},
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def _file(folder: Path, name: str, kind: str) -> Path:
    return folder / f"{name}.{kind}.safetensors"


def cached_input_stats(
    model: nn.Module,
    names: Sequence[str],
    task: Any,
    *,
    model_id: str,
    cache_root: Path,
    full: Collection[str] = (),
    progress: bool = False,
) -> dict[str, InputStats]:
    """:func:`collect_input_stats` on ``task`` (a :class:`mpq.tasks.Task`), read from and
    written to ``cache_root`` (one pass computes whatever is missing)."""
    from safetensors.torch import load_file, save_file

    from mpq.models import model_fingerprint

    folder = Path(cache_root) / stats_key(model_id, model_fingerprint(model), str(task.key))
    out: dict[str, InputStats] = {}
    todo_names, todo_full = [], []
    for n in names:
        d_path, f_path = _file(folder, n, "diag"), _file(folder, n, "full")
        if d_path.is_file() and (n not in full or f_path.is_file()):
            try:
                d = load_file(str(d_path))
                h = load_file(str(f_path))["full"] if n in full else None
                out[n] = InputStats(d["diag"], h, int(d["rows"].item()))
                continue
            except Exception:  # a damaged file: recompute it
                pass
        todo_names.append(n)
        if n in full:
            todo_full.append(n)
    if todo_names:
        fresh = collect_input_stats(model, todo_names, task, full=todo_full, progress=progress)
        folder.mkdir(parents=True, exist_ok=True)
        for n, st in fresh.items():
            rows = torch.tensor([st.rows], dtype=torch.int64)
            _atomic_save(save_file, {"diag": st.diag, "rows": rows}, _file(folder, n, "diag"))
            if st.full is not None:
                _atomic_save(save_file, {"full": st.full}, _file(folder, n, "full"))
        out.update(fresh)
    return {n: out[n] for n in names}


def _atomic_save(save: Any, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    data = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save(data, str(tmp)))


def merge_stats(parts: Sequence[Mapping[str, InputStats]]) -> dict[str, InputStats]:
    """Statistics over the union of several calibration sets (means weighted by rows)."""
    if not parts:
        raise MpqError("merge_stats needs at least one set of statistics")
    out: dict[str, InputStats] = {}
    for name in parts[0]:
        items = [p[name] for p in parts]
        rows = sum(s.rows for s in items)
        diag = sum((s.diag * s.rows for s in items), torch.zeros_like(items[0].diag)) / rows
        full = None
        if all(s.full is not None for s in items):
            first = items[0].full
            assert first is not None
            acc = torch.zeros_like(first)
            for s in items:
                assert s.full is not None
                acc += s.full * s.rows
            full = acc / rows
        out[name] = InputStats(diag=diag, full=full, rows=rows)
    return out
