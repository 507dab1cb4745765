"""llama.cpp overrides (``--format llamacpp``): the plan's bit-widths as llama-quantize k-quants.

llama.cpp quantizes with its own k-quant schemes, so this export reproduces the plan's
*bit-widths* per tensor, not mpq's exact values. The folder holds

- ``source-f16.gguf``: the fp model as a LLaMA GGUF (targets F16, other tensors at their
  dtype), what ``llama-quantize`` reads (same writer and names as ``--format gguf``);
- ``tensor-types.txt``: one ``<regex>=<type>`` line per tensor, in GGUF tensor names
  (``blk\\.0\\.attn_q\\.weight=q4_K``), the arguments of ``--tensor-type``;
- ``llama-quantize.sh``: the command line (``--pure`` so that nothing but these overrides
  decides a type), and ``plan.json``.

Bits map to ``q2_K, q3_K, q4_K, q5_K, q6_K, q8_0 (7 and 8 bits), f16 (16)``. k-quants need rows of
whole 256-value super-blocks; for other row lengths the override names a 32-block type itself
(``q2_K``/``q3_K`` -> ``iq4_nl``, ``q4_K`` -> ``q5_0``, ``q5_K`` -> ``q5_1``, ``q6_K`` -> ``q8_0``:
llama.cpp's own fallbacks, except that llama.cpp 0.3.36 falls back from ``q2_K``/``q3_K`` to
``q4_0``, of the same size as ``iq4_nl``), so llama-quantize never has to fall back. Non-target 2-D
tensors (excluded embeddings) keep their dtype (``f32``), as the plan counts them. The predicted
bytes are those of the file llama-quantize writes (type sizes from ``gguf.GGML_QUANT_SIZES``); they
are larger than the plan's mpq bytes because k-quants carry more per-block metadata than mpq's per-
channel scales.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mpq.export.common import ContainerCost, Exporter, ExportInput, target_numel
from mpq.export.gguf_writer import (
    _config,
    _fixed_tensors,
    _name_map,
    f16_source_plan,
    gguf_name,
    read_tensor_bytes,
    type_bytes,
    write_gguf,
)
from mpq.formats import KEEP_BITS, QuantFormat, matrix_shape
from mpq.plan import BitPlan, atomic_write_text
from mpq.targets import Target

SOURCE = "source-f16.gguf"
TYPES_FILE = "tensor-types.txt"
SCRIPT = "llama-quantize.sh"
OUTPUT = "model-mpq.gguf"
KQUANTS = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 7: "q8_0", 8: "q8_0", 16: "f16"}
FALLBACK = {"q2_K": "iq4_nl", "q3_K": "iq4_nl", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}
QK_K = 256
MAPS = "bits 2->q2_K, 3->q3_K, 4->q4_K, 5->q5_K, 6->q6_K, 7/8->q8_0, 16->f16 (rows of 32*k values)"
DEFAULT_FORMATS = "3:g32:asym,4:g32:asym,5:g32:asym,6:g32:asym,8:g32"


def llama_type(bits: int, cols: int) -> str:
    """The llama.cpp type name for ``bits`` on rows of ``cols`` values (see module doc)."""
    name = KQUANTS[bits]
    if name.endswith("_K") and cols % QK_K:
        name = FALLBACK[name]
    return name


def _gguf_type(name: str) -> str:
    return name.upper()  # ggml type names: q4_K -> Q4_K, iq4_nl -> IQ4_NL


def check(plan: BitPlan, targets: Sequence[Target], model: nn.Module) -> list[str]:
    _config(model)
    problems = []
    for t in targets:
        fmt = plan.formats[t.name]
        _, cols = matrix_shape(t.shape)
        if fmt.act_bits != KEEP_BITS:
            problems.append(f"{t.name}: {fmt.spec()} quantizes activations; llama.cpp does not")
        elif fmt.hi is not None:
            problems.append(
                f"{t.name}: {fmt.spec()} is row-mixed; a GGUF tensor has one type (export with "
                f"--format mpq, or solve without '+' formats)"
            )
        elif not fmt.keep and cols % 32:
            problems.append(f"{t.name}: rows of {cols} values fit no llama.cpp block type")
        elif t.kind == "conv2d":
            problems.append(f"{t.name}: llama.cpp export handles Linear and Embedding layers")
    return problems


def overrides(plan: BitPlan, targets: Sequence[Target], model: nn.Module) -> dict[str, str]:
    """``{gguf tensor name: llama.cpp type}`` for every 2-D tensor of the model."""
    names = _name_map(model)
    out = {}
    for t in targets:
        _, cols = matrix_shape(t.shape)
        out[gguf_name(names, f"{t.name}.weight")] = llama_type(plan.formats[t.name].bits, cols)
    for key, value in _fixed_tensors(model, targets).items():
        if value.dim() >= 2:
            out[gguf_name(names, key)] = "f16" if value.dtype == torch.float16 else "f32"
    return out


def weight_bytes(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Bytes llama-quantize stores for one weight at ``fmt`` (its llama.cpp type's size)."""
    _, cols = matrix_shape(shape)
    return type_bytes(_gguf_type(llama_type(fmt.bits, cols)), shape)


def command(types: dict[str, str], base: str) -> list[str]:
    """The llama-quantize argument vector reproducing ``types`` (``base``: its ftype argument,
    the type of tensors no override names)."""
    argv = ["llama-quantize", "--pure"]
    for name, kind in types.items():
        argv += ["--tensor-type", f"{re.escape(name)}={kind}"]
    return [*argv, SOURCE, OUTPUT, base]


def _base_type(types: dict[str, str], targets: Sequence[Target], model: nn.Module) -> str:
    names = _name_map(model)
    weight: dict[str, int] = {}
    for t in targets:
        kind = types[gguf_name(names, f"{t.name}.weight")]
        weight[kind] = weight.get(kind, 0) + t.numel
    base = max(weight, key=lambda k: weight[k])
    # llama-quantize's ftype argument: the type names it accepts (Q4_K is Q4_K_M's base).
    return {"q2_K": "Q2_K", "q3_K": "Q3_K_M", "q4_K": "Q4_K_M", "q5_K": "Q5_K_M"}.get(
        base, base.upper()
    )


def _write(inp: ExportInput, folder: Path) -> list[str]:
    notes = write_gguf(inp, folder / SOURCE, f16_source_plan(inp))
    types = overrides(inp.plan, inp.targets, inp.model)
    lines = [f"{re.escape(name)}={kind}" for name, kind in types.items()]
    atomic_write_text(folder / TYPES_FILE, "\n".join(lines) + "\n")
    argv = command(types, _base_type(types, inp.targets, inp.model))
    script = (
        "#!/bin/sh\n# Reproduces the mpq plan's per-tensor bit-widths with llama.cpp k-quants.\n"
        "# Run from this folder; writes " + OUTPUT + ".\nset -e\n" + shlex.join(argv) + "\n"
    )
    atomic_write_text(folder / SCRIPT, script)
    (folder / SCRIPT).chmod(0o755)
    inp.plan.save(folder / "plan.json")
    notes.append(
        "llama-quantize re-quantizes with k-quants: the bit-widths follow the plan, the values "
        "are llama.cpp's own; the stored bytes are predicted from GGML type sizes"
    )
    return notes


def measure(folder: Path, inp: ExportInput) -> ContainerCost:
    """Bytes of the file llama-quantize will write: the source GGUF's tensors (read back) with
    each overridden tensor at its override type's size."""
    names = _name_map(inp.model)
    types = dict(
        line.split("=", 1) for line in (folder / TYPES_FILE).read_text().splitlines() if line
    )
    sizes = read_tensor_bytes(folder / SOURCE)
    shapes = {gguf_name(names, f"{t.name}.weight"): t.shape for t in inp.targets}
    fixed = {
        gguf_name(names, k): tuple(v.shape)
        for k, v in _fixed_tensors(inp.model, inp.targets).items()
    }
    total = tb = 0
    for name, size in sizes.items():
        kind = types.get(re.escape(name))
        if kind is not None:
            size = type_bytes(_gguf_type(kind), shapes.get(name) or fixed[name])
        total += size
        if name in shapes:
            tb += size
    return ContainerCost(total, tb, target_numel(inp.targets))


LLAMACPP_EXPORTER = Exporter(
    name="llamacpp",
    description="F16 source GGUF + llama-quantize --tensor-type overrides (k-quants)",
    maps=MAPS,
    check=check,
    weight_bytes=weight_bytes,
    write=_write,
    measure=measure,
    maps_format=lambda fmt: fmt.act_bits == KEEP_BITS and fmt.hi is None,  # one type per tensor
    default_formats=DEFAULT_FORMATS,
)
