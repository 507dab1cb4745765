"""GGUF export (``--format gguf``): a LLaMA-architecture GGUF file llama.cpp can run.

Formats that map (group size 32, fp16 scales, rtn or gptq codes, no activation bits):

============  =========  =============================================================
mpq format    GGUF type  block (32 weights)
============  =========  =============================================================
``8:g32``     Q8_0       fp16 d, 32 x int8 q;            w = d * q
``5:g32``     Q5_0       fp16 d, 32 high bits, 16 nibbles; w = d * (u - 16)
``4:g32``     Q4_0       fp16 d, 16 nibbles;             w = d * (u - 8)
``5:g32:asym``Q5_1       fp16 d, fp16 m, high bits, nibbles; w = d * u + m
``4:g32:asym``Q4_1       fp16 d, fp16 m, 16 nibbles;     w = d * u + m
``4:g32:nl``  IQ4_NL     fp16 d, 16 nibbles;             w = d * kvalues[u]
``16``        F16        the kept fp16 weight
============  =========  =============================================================

``:dq`` formats (double-quantized scales, :mod:`mpq.quant.dq`) map to the k-quants (256-weight
super-blocks, :mod:`mpq.export.kquants`): ``4:g32:asym:dq`` Q4_K, ``5:g32:asym:dq`` Q5_K,
``6:g16:dq8`` Q6_K, ``3:g16:dq`` Q3_K, ``2:g16:asym:dq4`` Q2_K, ``4:g32:nl:dq`` IQ4_XS, all
written bit-exact at exactly mpq's bytes. A k-quant needs rows of whole super-blocks: a ``:dq``
layer whose rows do not divide 256 (SmolLM2's 576-wide q/k/v/o/gate/up) has no GGUF type (mpq's
own container stores the shorter last super-block): :func:`refuses` says so, ``mpq export`` then
leaves that ``:dq`` option out for those layers with a note, and a given ``--plan`` using it is
refused by name.

``u`` is mpq's unsigned code. The symmetric types store mpq's codes and scales unchanged, so
gguf's dequantization reproduces mpq's dequantized weights bit for bit, at exactly mpq's bytes.
The asymmetric types store the minimum ``m = -z * d`` as fp16 instead of mpq's integer
zero-point ``z``: each weight differs from mpq's ``(u - z) * d`` by the fp16 rounding of ``m``
(at most half an fp16 ulp of ``z * d``), and each block costs 16 bits of ``m`` instead of
``b`` bits of ``z`` (container overhead). Every non-target tensor (norms, excluded embeddings)
is written at its own dtype (F32 for an fp32 model), as the cost model counts it.

Tensor names and metadata follow llama.cpp's ``convert_hf_to_gguf.py`` for LLaMA: names from
``gguf``'s own ``TensorNameMap`` (``token_embd``, ``blk.N.attn_q``, ``blk.N.ffn_down``,
``output_norm``, ``output``...), q/k rows permuted to llama.cpp's rotary layout (a row
permutation, so whole rows of blocks move unchanged), a tied LM head written once as
``token_embd``, and ``llama.*`` hyperparameters. A BPE ``tokenizer.json`` (SmolLM2's) is written
as a ``gpt2`` tokenizer with its merges and special tokens; other tokenizers are noted, not
written. The plan rides along as the ``mpq.plan`` string.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpq.cost import target_tensor_keys, tensor_key, unique_tensors
from mpq.errors import MpqError
from mpq.export.common import (
    ContainerCost,
    Exporter,
    ExportInput,
    codes_scales_zeros,
    target_numel,
)
from mpq.export.kquants import K_MAPS, k_blocks, k_type_name
from mpq.formats import KEEP_BITS, SUPER_BLOCK, QuantFormat, matrix_shape
from mpq.plan import BitPlan, uniform_plan
from mpq.quant.core import DoubleQuant
from mpq.quant.dq import take_rows
from mpq.targets import Target

GGUF_FILE = "model.gguf"
BLOCK = 32
# (bits, symmetric) -> GGML type name, for group size 32 with fp16 scales.
QUANT_TYPES: dict[tuple[int, bool], str] = {
    (8, True): "Q8_0",
    (5, True): "Q5_0",
    (4, True): "Q4_0",
    (5, False): "Q5_1",
    (4, False): "Q4_1",
}
MAPS = (
    "8:g32 -> Q8_0, 5:g32 -> Q5_0, 4:g32 -> Q4_0, 5:g32:asym -> Q5_1, 4:g32:asym -> Q4_1, "
    "4:g32:nl -> IQ4_NL, 16 -> F16, " + K_MAPS
)
DEFAULT_FORMATS = "4:g32,4:g32:asym,5:g32,5:g32:asym,8:g32"


def gguf_type_name(fmt: QuantFormat) -> str | None:
    """The GGML type that stores ``fmt`` exactly as mpq does (None when none does; a GGUF tensor
    has one type, so a row-mixed format has none)."""
    if fmt.act_bits != KEEP_BITS or fmt.hi is not None:
        return None
    if fmt.keep:
        return "F16"
    if fmt.dq_bits is not None:
        return k_type_name(fmt)
    if fmt.grid == "nl" and fmt.group_size == BLOCK and fmt.scale_dtype == "float16":
        return "IQ4_NL"  # d * kvalues[u]: mpq's nl levels are llama.cpp's
    if fmt.grid != "int":
        return None
    if fmt.group_size != BLOCK or fmt.scale_dtype != "float16":
        return None
    return QUANT_TYPES.get((fmt.bits, fmt.symmetric))


def _config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        kind = getattr(cfg, "model_type", type(model).__name__)
        raise MpqError(
            f"GGUF export writes LLaMA-architecture models; this model is {kind!r}; use "
            f"--format mpq or hf"
        )
    return cfg


def _name_map(model: nn.Module) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(_config(model).num_hidden_layers))


def gguf_name(name_map: Any, tensor: str) -> str:
    """llama.cpp's name of a Hugging Face tensor (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``)."""
    got = name_map.get_name(tensor, try_suffixes=(".weight", ".bias"))
    if got is None:
        raise MpqError(
            f"tensor {tensor!r} has no llama.cpp name; GGUF export handles LLaMA models "
            f"(embeddings, attention, MLP, norms); use --format mpq"
        )
    return str(got)


def check(plan: BitPlan, targets: Sequence[Target], model: nn.Module) -> list[str]:
    _config(model)
    problems = []
    for t in targets:
        fmt = plan.formats[t.name]
        name = gguf_type_name(fmt)
        if name is None:
            problems.append(f"{t.name}: {fmt.spec()} has no GGUF type")
            continue
        _, cols = matrix_shape(t.shape)
        if fmt.dq_bits is not None and cols % SUPER_BLOCK:
            problems.append(
                f"{t.name}: {fmt.spec()} is {name}, whose {SUPER_BLOCK}-weight super-blocks must "
                f"fill a row, and its rows have {cols} values (mpq stores a shorter last "
                f"super-block, GGUF cannot); give this layer a format without :dq"
            )
        if t.kind == "conv2d":
            problems.append(f"{t.name}: GGUF export handles Linear and Embedding layers")
    return problems


def type_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a ``shape`` tensor stored as the GGML type ``type_name``."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows, cols = matrix_shape(shape)
    if cols % block:
        raise MpqError(f"a row of {cols} values does not fill whole {type_name} blocks of {block}")
    return rows * (cols // block) * size


def _fixed_tensors(model: nn.Module, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
    """The state dict's tensors that are not target weights, each memory once."""
    target_keys = target_tensor_keys(model, targets)
    return {
        n: v
        for n, v in unique_tensors(model.state_dict()).items()
        if tensor_key(v) not in target_keys
    }


def refuses(shape: tuple[int, ...], fmt: QuantFormat) -> str | None:
    """Why GGUF cannot store a ``shape`` weight at ``fmt`` (None when it can): k-quants need
    rows of whole 256-weight super-blocks."""
    _, cols = matrix_shape(shape)
    if fmt.dq_bits is not None and cols % SUPER_BLOCK:
        return f"rows of {cols} values do not fill whole {SUPER_BLOCK}-weight k-quant super-blocks"
    return None


def weight_bytes(shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Bytes the GGUF file stores for one weight at ``fmt`` (its GGML type's block size)."""
    name = gguf_type_name(fmt)
    if name is None:
        raise MpqError(f"{fmt.spec()} has no GGUF type ({MAPS})")
    _, cols = matrix_shape(shape)
    if fmt.dq_bits is not None and cols % SUPER_BLOCK:
        raise MpqError(
            f"{fmt.spec()} is {name}, whose {SUPER_BLOCK}-weight super-blocks must fill a row; "
            f"a {list(shape)} weight has rows of {cols}: leave :dq formats out of --formats for "
            f"a GGUF export of this model, or use --format mpq (which stores the shorter block)"
        )
    return type_bytes(name, shape)


def _permutation(rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: ``convert_hf_to_gguf.LlamaModel.permute`` of row indices."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _row_permutations(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg = _config(model)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    out = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn.q_proj") or name.endswith("self_attn.k_proj"):
            w = getattr(module, "weight", None)
            assert isinstance(w, torch.Tensor)
            n = heads if name.endswith("q_proj") else kv
            out[name] = _permutation(int(w.shape[0]), n)
    return out


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(-1, 2)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """GGML's 4-bit layout: byte j = u[j] | u[j + 16] << 4 for a block of 32 codes."""
    low = (u & 0x0F).astype(np.uint8)
    return (low[:, :16] | (low[:, 16:] << 4)).astype(np.uint8)


def _high_bits(u: np.ndarray) -> np.ndarray:
    """Q5's ``qh``: bit 4 of code i as bit i of a little-endian uint32."""
    bits = ((u >> 4) & 1).astype(np.uint8)
    return np.packbits(bits, axis=-1, bitorder="little").reshape(-1, 4)


def quantized_blocks(
    type_name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
) -> np.ndarray:
    """GGML blocks ``[rows, groups * type_size]`` (uint8) of mpq codes/scales/zero-points of a
    group-32 fp16-scale format."""
    rows, cols = codes.shape
    u = codes.numpy().astype(np.uint8).reshape(-1, BLOCK)
    d = _fp16_bytes(scales.reshape(-1))
    parts: list[np.ndarray]
    if type_name == "Q8_0":
        parts = [d, (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif type_name in ("Q4_0", "IQ4_NL"):  # IQ4_NL: the nibble indexes the nl levels
        parts = [d, _nibbles(u)]
    elif type_name == "Q5_0":
        parts = [d, _high_bits(u), _nibbles(u)]
    else:
        assert zeros is not None, "asymmetric types need zero-points"
        m = _fp16_bytes(-(zeros.reshape(-1).to(torch.float32) * scales.reshape(-1).float()))
        parts = [d, m, _nibbles(u)] if type_name == "Q4_1" else [d, m, _high_bits(u), _nibbles(u)]
    blocks = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def codes_double_quant(packed: nn.Module, name: str) -> tuple[torch.Tensor, DoubleQuant]:
    """Unsigned codes and the stored scale codes of the packed ``:dq`` module ``name``."""
    from mpq.kernels.modules import PackedWeight

    pw = packed.get_submodule(name).packed
    assert isinstance(pw, PackedWeight)
    return pw.codes(), pw.double_quant()


def _add_metadata(writer: Any, model: nn.Module, inp: ExportInput, ftype: int) -> None:
    import gguf

    cfg = _config(model)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    rope = getattr(cfg, "rope_theta", None)
    if rope is None:
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_name(Path(inp.model_id).name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("mpq.plan", inp.plan.to_json())


def _add_tokenizer(writer: Any, inp: ExportInput, vocab_size: int, tmp: Path) -> list[str]:
    """Write a BPE tokenizer (``gpt2`` model) as llama.cpp expects; note anything else."""
    import json

    import gguf

    tok = inp.tokenizer
    if tok is None:
        return ["no tokenizer: the GGUF has no tokenizer metadata; llama.cpp needs one to run"]
    tok.save_pretrained(str(tmp))
    tj = tmp / "tokenizer.json"
    kind = json.loads(tj.read_text())["model"]["type"] if tj.is_file() else type(tok).__name__
    if kind != "BPE":
        return [f"tokenizer of type {kind!r} not written to the GGUF (only BPE is); llama.cpp "
                f"needs tokenizer metadata to run the file"]  # fmt: skip
    vocab: dict[str, int] = tok.get_vocab()
    added = {t.content: t for t in getattr(tok, "added_tokens_decoder", {}).values()}
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif s in added:
            tokens.append(s)
            special = bool(getattr(added[s], "special", False))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(s)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "smollm" in inp.model_id.lower() else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
    return []


def write_gguf(inp: ExportInput, path: Path, plan: BitPlan | None = None) -> list[str]:
    """Write ``inp``'s model as GGUF at ``path`` under ``plan`` (default ``inp.plan``; a
    plan with every target at 16 writes the F16 source file llama-quantize reads)."""
    import tempfile

    import gguf

    plan = plan or inp.plan
    model = inp.model
    cfg = _config(model)
    names = _name_map(model)
    perms = _row_permutations(model)
    packed = inp.packed if plan is inp.plan else None
    types = {t.name: gguf_type_name(plan.formats[t.name]) for t in inp.targets}
    counts: dict[str, int] = {}
    for tg in inp.targets:
        counts[str(types[tg.name])] = counts.get(str(types[tg.name]), 0) + tg.numel
    main = max(counts, key=lambda k: counts[k]) if counts else "F32"
    ftype = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
        "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_M,
        "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M,
        "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
        "IQ4_NL": gguf.LlamaFileType.MOSTLY_IQ4_NL,
        "IQ4_XS": gguf.LlamaFileType.MOSTLY_IQ4_XS,
    }[main]
    writer = gguf.GGUFWriter(str(path), "llama")
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        _add_metadata(writer, model, inp, int(ftype))
        notes += _add_tokenizer(writer, inp, int(cfg.vocab_size), Path(tmp))
    # Tensors in model order: targets from their packed codes, the rest at their own dtype.
    fixed = _fixed_tensors(model, inp.targets)
    by_weight = {f"{t.name}.weight": t for t in inp.targets}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in unique_tensors(model.state_dict()).items():
            t = by_weight.get(key)
            if t is None and key not in fixed:
                continue  # an alias of a target (tied LM head): written once, as the target
            gname = gguf_name(names, key)
            perm = perms.get(key.rsplit(".", 1)[0])
            if t is None:
                arr = value.detach()
                arr = arr[perm] if perm is not None else arr
                dtype = np.float16 if value.dtype == torch.float16 else np.float32
                writer.add_tensor(gname, arr.to(torch.float32).numpy().astype(dtype))
                continue
            type_name = types[t.name]
            assert type_name is not None
            if type_name == "F16":
                w = modules[t.name].weight
                assert isinstance(w, torch.Tensor)
                arr16 = w.detach().to(torch.float16)
                arr16 = arr16[perm] if perm is not None else arr16
                writer.add_tensor(gname, arr16.numpy())
                continue
            assert packed is not None
            if type_name.endswith("_K") or type_name == "IQ4_XS":
                codes, dq = codes_double_quant(packed, t.name)
                if perm is not None:  # whole rows move: every per-row tensor follows
                    codes, dq = codes[perm], take_rows(dq, perm)
                blocks = k_blocks(type_name, codes, dq)
                writer.add_tensor(gname, blocks, raw_dtype=gguf.GGMLQuantizationType[type_name])
                continue
            codes, scales, zeros = codes_scales_zeros(packed, t.name)
            if perm is not None:
                codes, scales = codes[perm], scales[perm]
                zeros = zeros[perm] if zeros is not None else None
            blocks = quantized_blocks(type_name, codes, scales, zeros)
            writer.add_tensor(gname, blocks, raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return notes


def _write(inp: ExportInput, folder: Path) -> list[str]:
    notes = write_gguf(inp, folder / GGUF_FILE)
    inp.plan.save(folder / "plan.json")
    return notes


def read_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor's data in a GGUF file, read back with ``gguf.GGUFReader``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: int(t.n_bytes) for t in reader.tensors}


def measure(folder: Path, inp: ExportInput) -> ContainerCost:
    sizes = read_tensor_bytes(folder / GGUF_FILE)
    names = _name_map(inp.model)
    target_names = {gguf_name(names, f"{t.name}.weight") for t in inp.targets}
    tb = sum(n for k, n in sizes.items() if k in target_names)
    return ContainerCost(sum(sizes.values()), tb, target_numel(inp.targets))


def f16_source_plan(inp: ExportInput) -> BitPlan:
    """Every target kept at fp16: the plan of the source file llama-quantize starts from."""
    return uniform_plan(inp.targets, QuantFormat(bits=KEEP_BITS), inp.plan.model_id)


GGUF_EXPORTER = Exporter(
    name="gguf",
    description="LLaMA GGUF file (Q8_0/Q5_0/Q5_1/Q4_0/Q4_1, Q2_K..Q6_K, F16 per tensor) for "
    "llama.cpp",
    maps=MAPS,
    check=check,
    weight_bytes=weight_bytes,
    write=_write,
    measure=measure,
    maps_format=lambda fmt: gguf_type_name(fmt) is not None,
    default_formats=DEFAULT_FORMATS,
    refuses=refuses,
)
