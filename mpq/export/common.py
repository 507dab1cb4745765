"""What every export format shares: the input of a writer, container costs, the manifest.

An export is a folder. Each format writes its files into it and a manifest,
``mpq_manifest.json``, that names the format, the model, the plan's predicted bytes, the bytes
the container actually stores (read back from the written files) and the sha256 of every file,
so :func:`mpq.export.load.load` can refuse a folder whose files changed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.cost import CostModel, CostReport, Refusal, Storage, WeightBytes
from mpq.envelope import unwrap, wrap
from mpq.errors import MpqError
from mpq.files import clean_stale_temps, exclusive, normalize_modes, sha256_file, temp_dir
from mpq.formats import QuantFormat
from mpq.plan import BitPlan, atomic_write_text
from mpq.targets import Target

MANIFEST = "mpq_manifest.json"
MANIFEST_TYPE = "MpqExport"
MANIFEST_VERSION = 1


@dataclass
class ExportInput:
    """Everything a writer needs: the fp model, its packed version under ``plan``, the targets,
    the model id it was loaded as (bundled id or folder path), its tokenizer and cost model."""

    model: nn.Module
    packed: nn.Module
    plan: BitPlan
    targets: Sequence[Target]
    model_id: str
    cost: CostModel
    tokenizer: Any = None


@dataclass(frozen=True)
class ContainerCost:
    """Bytes a container stores: ``total_bytes`` of tensor data (every tensor the model needs),
    ``target_bytes`` of it for the plan's targets (codes, scales, zero-points and any per-tensor
    bookkeeping the container adds), and ``target_numel``, the number of target weights."""

    total_bytes: int
    target_bytes: int
    target_numel: int

    @property
    def effective_bits(self) -> float:
        """Stored bits per target weight in this container."""
        return self.target_bytes * 8 / self.target_numel


@dataclass(frozen=True)
class Exporter:
    """One export format.

    ``check(plan, targets, model)`` lists why the format cannot hold a plan (empty = it can);
    ``maps`` says which mpq formats the container can store (for error messages);
    ``weight_bytes(shape, fmt)`` is the exact bytes the container stores for one target weight
    (its :class:`~mpq.cost.Storage`: ``mpq export`` solves under these bytes, and
    :meth:`predict` counts a plan with them); ``write(inp, folder)`` writes the files and
    returns notes; ``measure(folder, inp)`` reads the written files back and returns the bytes
    they hold; ``maps_format(fmt)`` says whether
    the container can store a format at all (candidate formats are checked before solving).
    """

    name: str
    description: str
    maps: str
    check: Callable[[BitPlan, Sequence[Target], nn.Module], list[str]]
    weight_bytes: WeightBytes
    write: Callable[[ExportInput, Path], list[str]]
    measure: Callable[[Path, ExportInput], ContainerCost]
    maps_format: Callable[[QuantFormat], bool] = lambda fmt: True
    default_formats: str = "3,4,5,6,8"
    refuses: Refusal = lambda shape, fmt: None

    @property
    def storage(self) -> Storage:
        return Storage(self.name, self.weight_bytes, self.refuses)

    def dropped(self, targets: Sequence[Target], formats: Sequence[QuantFormat]) -> list[str]:
        """One line per candidate format the container cannot store for some targets (the
        solve leaves that option out for them): how many, and why."""
        lines = []
        for fmt in formats:
            why = [(t.name, r) for t in targets if (r := self.refuses(t.shape, fmt)) is not None]
            if why:
                lines.append(
                    f"{fmt.spec()} left out for {len(why)} of {len(targets)} targets "
                    f"(e.g. {why[0][0]}: {why[0][1]})"
                )
        return lines

    def predict(self, plan: BitPlan, cost: CostModel) -> CostReport:
        """The container's figures for ``plan``, without writing (the written files hold
        exactly ``total_bytes``; :func:`mpq.export.command.export` checks it)."""
        return cost.in_container(self.storage).plan_cost(plan)

    def refuse(self, plan: BitPlan, targets: Sequence[Target], model: nn.Module) -> None:
        """Raise :class:`MpqError` listing every target the format cannot store."""
        problems = self.check(plan, targets, model)
        if problems:
            shown = "\n  - ".join(problems[:8])
            more = f"\n  - ... and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise MpqError(
                f"the {self.name} format cannot express this plan:\n  - {shown}{more}\n"
                f"what maps: {self.maps}; solve with --formats from that list or pick another "
                f"--format"
            )


@dataclass
class Manifest:
    """The ``mpq_manifest.json`` of an export folder."""

    format: str
    model_id: str
    files: dict[str, str]
    predicted_bytes: int
    stored_bytes: int
    stored_target_bytes: int
    budget: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mpq_version: str = ""

    def to_json(self) -> str:
        return json.dumps(wrap(MANIFEST_TYPE, MANIFEST_VERSION, asdict(self)), indent=1)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MpqError(
                f"{str(path)!r} is not a readable manifest ({exc}); export the model again"
            ) from None
        data = unwrap(obj, MANIFEST_TYPE, MANIFEST_VERSION, f"mpq export manifest ({path})",
                      "export the model again with this mpq")  # fmt: skip
        try:
            return cls(**data)
        except TypeError as exc:
            raise MpqError(f"{str(path)!r} is malformed ({exc}); export the model again") from None


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest, by relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    return atomic_write_text(folder / MANIFEST, manifest.to_json())


def verify_checksums(folder: Path, manifest: Manifest) -> None:
    """Raise :class:`MpqError` naming every missing or changed file of an export folder."""
    problems = []
    for name, digest in manifest.files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its sha256 in {MANIFEST}")
    if problems:
        raise MpqError(
            f"export folder {str(folder)!r} was changed after it was written: "
            + "; ".join(problems)
            + "; export the model again (or restore the files)"
        )


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, parsed header) of a safetensors file."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise MpqError(f"{str(path)!r} is not a safetensors file")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(fh.read(n))
        except json.JSONDecodeError as exc:
            raise MpqError(f"{str(path)!r} has a broken safetensors header: {exc}") from None
    return n, header


def stored_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor stored in a safetensors file (from its header's data offsets)."""
    _, header = safetensors_header(path)
    return {
        name: int(info["data_offsets"][1]) - int(info["data_offsets"][0])
        for name, info in header.items()
        if name != "__metadata__"
    }


def target_owner(tensor_name: str, targets: Sequence[Target]) -> Target | None:
    """The target whose module owns ``tensor_name`` (by module prefix, aliases included)."""
    for t in targets:
        for owner in (t.name, *t.aliases):
            if tensor_name.startswith(owner + "."):
                return t
    return None


def target_numel(targets: Sequence[Target]) -> int:
    return sum(t.numel for t in targets)


def hf_config(model: nn.Module) -> dict[str, Any] | None:
    """The Hugging Face config of ``model`` as a dict (None for non-HF models)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    out: dict[str, Any] = cfg.to_dict()
    out.pop("quantization_config", None)
    if not out.get("architectures"):
        out["architectures"] = [type(model).__name__]  # what mpq.load must rebuild
    return out


def formats_used(plan: BitPlan) -> list[QuantFormat]:
    seen: dict[str, QuantFormat] = {}
    for f in plan.formats.values():
        seen.setdefault(f.spec(), f)
    return list(seen.values())


def codes_scales_zeros(
    packed: nn.Module, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unsigned codes ``[rows, cols]``, scales ``[rows, groups]`` and zero-points (or None) of
    the packed module ``name`` (a :class:`~mpq.kernels.modules.PackedWeight` owner)."""
    from mpq.kernels.modules import PackedWeight

    pw = packed.get_submodule(name).packed
    assert isinstance(pw, PackedWeight)
    return pw.codes(), pw.scales, pw.zeros()


def check_output_folder(out: Path, force: bool) -> None:
    """MpqError for an ``--out`` that must not be written: an existing one without ``force``,
    a file, the current folder or one of its ancestors, or a filesystem root."""
    resolved = out.resolve()
    if resolved == resolved.parent or not out.name or out.name in (".", ".."):
        raise MpqError(
            f"--out {str(out)!r} is not a folder mpq can replace; give a new folder's path, "
            f"e.g. --out exports/model"
        )
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise MpqError(
            f"--out {str(out)!r} is the current folder or contains it; replacing it would delete "
            f"your working files: give a new folder's path, e.g. --out exports/model"
        )
    if out.exists() and not out.is_dir():
        raise MpqError(f"--out {str(out)!r} is a file; give a folder path")
    if out.exists() and not force:
        raise MpqError(
            f"output folder {str(out)!r} already exists; pass --force to replace it or choose "
            f"another --out"
        )


@contextmanager
def output_folder(out: Path, force: bool) -> Iterator[Path]:
    """A fresh temporary folder next to ``out`` (``.NAME.tmp-<pid>-XXXX``, the umask's mode),
    renamed to ``out`` when the block succeeds (an existing ``out`` is replaced only then, and
    only with ``force``); removed on failure. Held under a lock (a second writer of the same
    ``out`` gets an MpqError); temporaries left by killed runs are removed first."""
    check_output_folder(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MpqError(
            f"cannot create {str(out.parent)!r}: {exc.strerror}; choose another --out"
        ) from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise MpqError(f"{str(out.parent)!r} is not writable; choose another --out")
    with exclusive(out):
        check_output_folder(out, force)  # another process may have finished it meanwhile
        clean_stale_temps(out)
        tmp = temp_dir(out)
        try:
            yield tmp
            normalize_modes(tmp)  # safetensors writes 0600; exports are meant to be shared
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
