"""GGUF k-quants written from mpq's ``:dq`` codes: gguf's own dequantizer is the oracle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cycled_plan

from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.export.command import export as export_plan
from mpq.export.command import exporters
from mpq.export.gguf_writer import GGUF_FILE, _name_map, _row_permutations, gguf_name
from mpq.export.kquants import K_TYPES, k_blocks
from mpq.formats import QuantFormat
from mpq.models import LoadedModel
from mpq.pipeline import Prepared
from mpq.plan import BitPlan
from mpq.quant.core import DoubleQuant
from mpq.quant.dq import dequantize_dq
from mpq.quant.quantize import quantize
from mpq.targets import discover

SPECS = {
    "4:g32:nl:dq": "IQ4_XS",
    "2:g16:asym:dq4": "Q2_K",
    "3:g16:dq": "Q3_K",
    "4:g32:asym:dq": "Q4_K",
    "5:g32:asym:dq": "Q5_K",
    "6:g16:dq8": "Q6_K",
}


def _random_dq(
    fmt: QuantFormat, rows: int, cols: int, seed: int
) -> tuple[torch.Tensor, DoubleQuant]:
    """Every code value reachable: uniform codes over the whole range of each field."""
    assert fmt.group_size is not None and fmt.dq_bits is not None
    g = torch.Generator().manual_seed(seed)
    groups, supers = cols // fmt.group_size, cols // 256
    codes = torch.randint(0, 1 << fmt.bits, (rows, cols), generator=g).to(torch.uint8)
    sc = torch.randint(0, 1 << fmt.dq_bits, (rows, groups), generator=g).to(torch.uint8)
    d = (torch.rand(rows, supers, generator=g) * 0.02 - 0.01).to(torch.float16)
    if fmt.symmetric:
        return codes, DoubleQuant(d, sc)
    mn = torch.randint(0, 1 << fmt.dq_bits, (rows, groups), generator=g).to(torch.uint8)
    dm = (torch.rand(rows, supers, generator=g) * 0.01).to(torch.float16)
    return codes, DoubleQuant(d.abs(), sc, dm, mn)


@pytest.mark.parametrize("spec", list(SPECS))
def test_k_blocks_dequantize_bit_exactly_in_gguf(spec: str) -> None:
    import gguf

    fmt = QuantFormat.parse(spec)
    qtype = gguf.GGMLQuantizationType[SPECS[spec]]
    for seed, (rows, cols) in enumerate(((3, 256), (2, 768))):
        codes, dq = _random_dq(fmt, rows, cols, seed)
        blocks = k_blocks(SPECS[spec], codes, dq)
        assert blocks.shape == (rows, cols // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
        got = gguf.quants.dequantize(blocks, qtype).reshape(rows, cols)
        assert np.array_equal(got, dequantize_dq(codes, dq, fmt).numpy()), (spec, rows, cols)
    # And from mpq's own rounding of a weight: round to nearest, and the importance-weighted
    # mse choice of the same layout.
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(4, 512, generator=gen) * 0.03
    imp = torch.rand(512, generator=gen) ** 4
    for qt in (quantize(w, fmt), quantize(w, replace(fmt, method="mse"), importance=imp)):
        assert qt.dq is not None
        blocks = k_blocks(SPECS[spec], qt.codes, qt.dq)
        got = gguf.quants.dequantize(blocks, qtype).reshape(4, 512)
        assert np.array_equal(got, dequantize_dq(qt.codes, qt.dq, fmt).numpy())


def test_iq4_xs_blocks_dequantize_bit_exactly_in_gguf() -> None:
    import gguf

    from mpq.export.kquants import iq4_xs_blocks

    levels = torch.tensor(gguf.quants.IQ4_NL.kvalues, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    rows, cols = 3, 512
    codes = torch.randint(0, 16, (rows, cols), generator=g).to(torch.uint8)
    sc = torch.randint(0, 64, (rows, cols // 32), generator=g).to(torch.uint8)
    d = (torch.rand(rows, cols // 256, generator=g) * 0.002 - 0.001).to(torch.float16)
    blocks = iq4_xs_blocks(codes, DoubleQuant(d, sc))
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.IQ4_XS).reshape(rows, cols)
    s = d.float().repeat_interleave(8, dim=1) * (sc.float() - 32)  # exact in float32
    want = (s.repeat_interleave(32, dim=1) * levels[codes.long()]).numpy()
    assert np.array_equal(got, want)


def test_every_k_type_is_covered() -> None:
    assert sorted([*K_TYPES.values(), "IQ4_XS"]) == sorted(SPECS.values())


def _prep_256() -> Prepared:
    """A tiny LLaMA whose rows are whole super-blocks (hidden 256, MLP 512)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    targets = discover(model, (), ())
    loaded = LoadedModel(model_id="tiny256", family="causal_lm", model=model)
    return Prepared(loaded, targets, build_cost_model(model, targets, "tiny256"))


def test_gguf_export_writes_k_quants_bit_exact(tmp_path: Path) -> None:
    import gguf

    prep = _prep_256()
    specs = [*SPECS, "4:g32", "4:g32:nl", "16"]
    plan = cycled_plan(prep, specs)
    report = export_plan(prep, plan, exporters()["gguf"], tmp_path / "g")
    packed = apply_plan(prep.loaded.model, plan, prep.targets)
    reader = gguf.GGUFReader(str(tmp_path / "g" / GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    names = _name_map(prep.loaded.model)
    perms = _row_permutations(prep.loaded.model)
    seen = set()
    for t in prep.targets:
        gt = tensors[gguf_name(names, f"{t.name}.weight")]
        seen.add(gt.tensor_type.name)
        got = gguf.quants.dequantize(gt.data, gt.tensor_type).reshape(t.shape)
        ref = packed.get_submodule(t.name).packed.dequantize().numpy()
        perm = perms.get(t.name)
        if perm is not None:  # llama.cpp's rotary row order for q and k
            ref = ref[perm.numpy()]
        assert np.array_equal(got, ref), t.name
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q4_0", "F16"} <= seen
    # The container's bytes are predicted exactly (GGML type sizes).
    assert report.stored.total_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert report.predicted_bytes == report.stored.total_bytes
    predicted = exporters()["gguf"].predict(plan, prep.cost)
    assert predicted.total_bits == 8 * report.stored.total_bytes


def test_gguf_refuses_dq_on_rows_that_do_not_fill_super_blocks(tmp_path: Path) -> None:
    from conftest import tiny_llama

    model = tiny_llama()
    targets = discover(model, (), ())
    prep = Prepared(LoadedModel("tiny", "causal_lm", model), targets,
                    build_cost_model(model, targets, "tiny"))  # fmt: skip
    plan = BitPlan({t.name: QuantFormat.parse("4:g32:asym:dq") for t in targets}, "tiny")
    with pytest.raises(MpqError, match=r"Q4_K, whose 256-weight super-blocks must fill a row.*64"):
        export_plan(prep, plan, exporters()["gguf"], tmp_path / "g")
    assert not (tmp_path / "g").exists()
    # mpq's own container stores the shorter super-block.
    export_plan(prep, plan, exporters()["mpq"], tmp_path / "m")
