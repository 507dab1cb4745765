"""compressed-tensors export (``--format compressed-tensors``): the checkpoint vLLM loads.

A Hugging Face folder whose ``config.json`` has a compressed-tensors ``quantization_config``
(``quant_method: "compressed-tensors"``, ``format: "pack-quantized"``, status ``compressed``)
with one ``config_groups`` entry per distinct format, each listing its layers by exact name, and
an ``ignore`` list of the Linear layers left unquantized. Weight-only integer formats map:

- 4 or 8 bits, symmetric or asymmetric, per output channel (``strategy: channel``) or in
  groups (``strategy: group``), fp16/bf16/fp32 scales, on Linear layers; 16 = a dense fp16
  weight (listed in ``ignore``).

Per quantized layer the file holds ``weight_packed`` (int32; the unsigned codes, 32 codes in
``b`` words, row by row: the same bit stream as mpq's packing without its sign flip),
``weight_scale`` ``[rows, groups]`` at the format's scale dtype, ``weight_shape`` (int64 [2])
and, asymmetric, ``weight_zero_point`` (the zero-points minus ``2^(b-1)``, packed along the
output dimension per group column). compressed-tensors dequantizes ``(q - zp) * scale`` in the
scale dtype, which is mpq's dequantized weight rounded to that dtype (exact for fp32 scales).
Container overhead against the plan: 16 bytes of ``weight_shape`` per layer and, asymmetric,
zero-points padded per group column instead of one stream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.cost import code_bits, keep_bits, packed_stream_bits, scale_bits
from mpq.errors import MpqError
from mpq.export.common import (
    ContainerCost,
    Exporter,
    ExportInput,
    codes_scales_zeros,
    formats_used,
    hf_config,
    stored_tensor_bytes,
    target_numel,
    target_owner,
)
from mpq.formats import KEEP_BITS, QuantFormat, matrix_shape, n_groups
from mpq.kernels.packing import pack
from mpq.plan import BitPlan, atomic_write_text
from mpq.targets import Target

WEIGHTS = "model.safetensors"
CT_BITS = (4, 8)
MAPS = "4 or 8 bits, sym or asym, per channel or g<N>, on Linear layers; 16 = dense fp16"
DEFAULT_FORMATS = "4,4:g64,8"
SHAPE_BYTES = 16  # weight_shape: int64 [2]


def supported(fmt: QuantFormat) -> bool:
    if fmt.act_bits != KEEP_BITS or fmt.dq_bits is not None or fmt.grid != "int":
        return False  # activations, double-quantized scales or level tables: no scheme
    if fmt.hi is not None:
        return False  # one scheme per tensor: no row-mixed weights
    return fmt.keep or fmt.bits in CT_BITS


def check(plan: BitPlan, targets: Sequence[Target], model: nn.Module) -> list[str]:
    if hf_config(model) is None:
        return ["the model has no Hugging Face config; compressed-tensors folders need one"]
    problems = []
    for t in targets:
        fmt = plan.formats[t.name]
        if not supported(fmt):
            problems.append(f"{t.name}: {fmt.spec()} is not a compressed-tensors int format")
        elif t.kind != "linear" and not fmt.keep:
            problems.append(
                f"{t.name}: a quantized {t.kind}; compressed-tensors packs Linear layers only "
                f"(give it 16 or leave it out with --exclude)"
            )
        elif t.aliases and not fmt.keep:
            problems.append(
                f"{t.name}: shared with {list(t.aliases)}; give it 16 or leave it out with "
                f"--exclude"
            )
    return problems


def layer_bytes(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Bytes compressed-tensors stores for one Linear weight at ``fmt``: mpq's codes and scales,
    zero-points packed per column of groups (``[groups, rows]`` streams) and the int64
    ``weight_shape``; a kept weight is a dense fp16 tensor."""
    if fmt.keep:
        return keep_bits(shape) // 8
    rows, cols = matrix_shape(shape)
    zeros = 0 if fmt.symmetric else packed_stream_bits(n_groups(cols, fmt), rows, fmt.bits)
    return (code_bits(shape, fmt) + scale_bits(shape, fmt) + zeros) // 8 + SHAPE_BYTES


def weight_args(fmt: QuantFormat) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` of the weights for ``fmt``."""
    return {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "strategy": "channel" if fmt.group_size is None else "group",
        "group_size": fmt.group_size,
        "dynamic": False,
        "observer": "minmax",
    }


def quantization_config(plan: BitPlan, model: nn.Module) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for i, fmt in enumerate(f for f in formats_used(plan) if not f.keep):
        groups[f"group_{i}"] = {
            "targets": [n for n, f in plan.formats.items() if f == fmt],
            "weights": weight_args(fmt),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    quantized = {n for n, f in plan.formats.items() if not f.keep}
    ignore = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized
    ]
    from importlib.metadata import PackageNotFoundError, version

    try:
        ct_version = version("compressed-tensors")
    except PackageNotFoundError:  # writing needs no compressed-tensors; reading does
        ct_version = "unknown"
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": ct_version,
        "mpq_plan": plan.to_dict(),
    }


def _write(inp: ExportInput, folder: Path) -> list[str]:
    from safetensors.torch import save_file

    cfg = hf_config(inp.model)
    if cfg is None:
        raise MpqError("compressed-tensors export needs a Hugging Face model; use --format mpq")
    state = inp.model.state_dict()
    quantized = {t.name: t for t in inp.targets if not inp.plan.formats[t.name].keep}
    kept = {t.name for t in inp.targets if inp.plan.formats[t.name].keep}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf == "weight":
            t = quantized[module]
            fmt = inp.plan.formats[t.name]
            codes, scales, zeros = codes_scales_zeros(inp.packed, t.name)
            tensors[f"{module}.weight_packed"] = pack(codes, fmt.bits)
            tensors[f"{module}.weight_scale"] = scales.contiguous()
            tensors[f"{module}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            if zeros is not None:
                tensors[f"{module}.weight_zero_point"] = pack(zeros.T.contiguous(), fmt.bits).T
            continue
        if value.data_ptr() in seen and value.numel():
            continue  # a tied tensor: once, as transformers writes it
        seen.add(value.data_ptr())
        if module in kept and leaf == "weight":
            value = value.to(torch.float16)
        tensors[key] = value.detach().contiguous()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    cfg["quantization_config"] = quantization_config(inp.plan, inp.model)
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    notes = []
    if inp.tokenizer is not None:
        inp.tokenizer.save_pretrained(str(folder))
    else:
        notes.append("the model has no tokenizer; none was written")
    return notes


def measure(folder: Path, inp: ExportInput) -> ContainerCost:
    sizes = stored_tensor_bytes(folder / WEIGHTS)
    tb = sum(n for k, n in sizes.items() if target_owner(k, inp.targets) is not None)
    return ContainerCost(sum(sizes.values()), tb, target_numel(inp.targets))


CT_EXPORTER = Exporter(
    name="compressed-tensors",
    description="compressed-tensors pack-quantized folder (vLLM), per-layer config_groups",
    maps=MAPS,
    check=check,
    weight_bytes=layer_bytes,
    write=_write,
    measure=measure,
    maps_format=supported,
    default_formats=DEFAULT_FORMATS,
)
