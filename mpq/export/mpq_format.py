"""The mpq format and the Hugging Face folder: packed safetensors that :func:`mpq.load` reads.

**mpq format** (``--format mpq``), a folder with

- ``model.safetensors``: the packed state dict (:func:`mpq.export.safetensors.save_packed`:
  ``qweight`` int32 words, ``scales``, packed ``qzeros``, fp16 kept weights, every other tensor
  at its dtype; tied tensors once, with an alias map and the plan in the metadata). No pickle.
  Its tensor bytes equal the plan's ``total_bytes`` to the byte.
- ``plan.json``: the :class:`~mpq.plan.BitPlan`.
- ``config.json``: the model's Hugging Face config (absent for models that have none).
- tokenizer files when the model has a tokenizer, and ``mpq_manifest.json`` (sha256 of each
  file, predicted and stored bytes).

**Hugging Face folder** (``--format hf``): the same tensors, laid out as ``save_pretrained``
does (``config.json`` + ``model.safetensors`` + tokenizer), with ``config.json`` carrying a
``quantization_config`` that describes the plan: ``quant_method: "mpq"``, ``version``, the
packing, and ``formats`` (each target's format spec) plus the full plan. ``mpq.load`` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mpq import __version__
from mpq.cost import packed_bytes
from mpq.export.common import (
    ContainerCost,
    Exporter,
    ExportInput,
    hf_config,
    safetensors_header,
    stored_tensor_bytes,
    target_numel,
    target_owner,
)
from mpq.export.safetensors import save_packed
from mpq.plan import BitPlan, atomic_write_text
from mpq.targets import Target

WEIGHTS = "model.safetensors"
PLAN = "plan.json"
QUANT_METHOD = "mpq"
HF_QUANT_VERSION = 1
PACKING = (
    "qweight: int32 words, one packed row per output channel, code j at bits [j*b,(j+1)*b) of "
    "the row's little-endian bit stream, stored as code XOR 2^(b-1); scales [rows, groups]; "
    "qzeros: unsigned zero-points as one packed stream (asymmetric formats); kept weights fp16"
)


def _check(plan: BitPlan, targets: Sequence[Target], model: nn.Module) -> list[str]:
    return []  # the packed layout stores every mpq format


def _measure(folder: Path, inp: ExportInput) -> ContainerCost:
    sizes = stored_tensor_bytes(folder / WEIGHTS)
    target = sum(n for k, n in sizes.items() if target_owner(k, inp.targets) is not None)
    return ContainerCost(sum(sizes.values()), target, target_numel(inp.targets))


def _save_tokenizer(inp: ExportInput, folder: Path) -> list[str]:
    if inp.tokenizer is None:
        return ["the model has no tokenizer; none was written"]
    inp.tokenizer.save_pretrained(str(folder))
    return []


def quantization_config(plan: BitPlan) -> dict[str, Any]:
    """The ``quantization_config`` entry of an mpq Hugging Face folder's config.json."""
    return {
        "quant_method": QUANT_METHOD,
        "version": HF_QUANT_VERSION,
        "mpq_version": __version__,
        "packing": PACKING,
        "formats": {n: f.spec() for n, f in plan.formats.items()},
        "plan": plan.to_dict(),
    }


def _write_common(inp: ExportInput, folder: Path, quant: bool) -> list[str]:
    notes = _save_tokenizer(inp, folder)
    save_packed(inp.packed, inp.plan, folder / WEIGHTS)
    cfg = hf_config(inp.model)
    if cfg is None:
        if quant:
            raise_no_config(inp)
        notes.append("the model has no Hugging Face config; mpq.load rebuilds it from its id")
    else:
        if quant:
            cfg["quantization_config"] = quantization_config(inp.plan)
        atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    return notes


def raise_no_config(inp: ExportInput) -> None:
    from mpq.errors import MpqError

    raise MpqError(
        f"model {inp.model_id!r} has no Hugging Face config, so it cannot be written as a "
        f"Hugging Face folder; use --format mpq"
    )


def _write_mpq(inp: ExportInput, folder: Path) -> list[str]:
    notes = _write_common(inp, folder, quant=False)
    inp.plan.save(folder / PLAN)
    return notes


def _write_hf(inp: ExportInput, folder: Path) -> list[str]:
    return _write_common(inp, folder, quant=True)


def header_bytes(path: Path) -> int:
    """Bytes of a safetensors file that are not tensor data (8-byte length + JSON header)."""
    n, _ = safetensors_header(path)
    return 8 + n


MPQ_EXPORTER = Exporter(
    name="mpq",
    description="packed safetensors + plan.json + config.json (mpq.load)",
    maps="every mpq format (2..8 bits, any group, sym/asym, fp16/bf16/fp32 scales, 16 = fp16)",
    check=_check,
    weight_bytes=packed_bytes,
    write=_write_mpq,
    measure=_measure,
)

HF_EXPORTER = Exporter(
    name="hf",
    description="save_pretrained-style folder, quantization_config quant_method 'mpq'",
    maps=MPQ_EXPORTER.maps,
    check=_check,
    weight_bytes=packed_bytes,
    write=_write_hf,
    measure=_measure,
)
