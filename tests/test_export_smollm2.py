"""`mpq export` on the real model (SmolLM2-135M): solve under a byte budget, write, reload."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from mpq.executor import apply_plan
from mpq.export.command import add_export_parser, run_export
from mpq.export.load import load_export
from mpq.export.mpq_format import WEIGHTS
from mpq.export.safetensors import tensor_bytes_in_file
from mpq.formats import QuantFormat
from mpq.pipeline import prepare
from mpq.plan import uniform_plan

pytestmark = pytest.mark.slow
INCLUDE = r"layers\.(0|29)\."  # two blocks keep the measured damage table small


def test_smollm2_exports_under_a_budget_and_reloads_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpq.recipes import recipe_for

    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    # the decisions `mpq export` makes for this model (its recipe: q, k, v untied)
    prep = prepare("smollm2-135m", include=[INCLUDE], ties=recipe_for("smollm2-135m").ties)
    lo, hi = (
        prep.cost.plan_cost(uniform_plan(prep.targets, QuantFormat.parse(s), "x")).total_bytes
        for s in ("4:asym", "8:asym")
    )
    budget = (lo + hi) // 2
    parser = argparse.ArgumentParser(prog="mpq")
    add_export_parser(parser.add_subparsers(dest="command"), ["ilp"])
    out = tmp_path / "smollm2-mpq"
    args = parser.parse_args(
        ["export", "--model", "smollm2-135m", "--include", INCLUDE, "--budget",
         f"bytes={budget / 1e6}MB", "--solver", "ilp", "--formats", "4:asym,8:asym",
         "--out", str(out), "--n", "1", "--seq-len", "32"]
    )  # fmt: skip
    report = run_export(args)
    # The bytes on disk are the plan's bytes, to the byte, and within the budget.
    assert tensor_bytes_in_file(out / WEIGHTS) == report.predicted_bytes <= budget
    assert {f.bits for f in report.plan.formats.values()} == {4, 8}  # a mixed plan
    assert len(report.plan.formats) == 14
    loaded = load_export(out)
    assert loaded.tokenizer is not None
    packed = apply_plan(prep.loaded.model, report.plan, prep.targets, mode="packed")
    ids = loaded.tokenizer("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, packed(ids).logits)


def test_smollm2_round_trips_through_gguf_compressed_tensors_and_hf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each container, written from the real model and read back by its own library (gguf's
    reader and dequantizer, compressed-tensors' decompressor, mpq.load for hf), gives mpq's
    dequantized weights: bit-exact for Q4_0, rounded to the fp16 scale dtype for
    compressed-tensors, identical logits for hf."""
    import gguf
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from mpq.export.command import export, exporters
    from mpq.export.gguf_writer import GGUF_FILE, _name_map, _row_permutations, gguf_name

    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    prep = prepare("smollm2-135m", include=[INCLUDE])
    plan = uniform_plan(prep.targets, QuantFormat.parse("4:g32"), prep.loaded.model_id)
    packed = apply_plan(prep.loaded.model, plan, prep.targets, mode="packed")
    ref = {t.name: packed.get_submodule(t.name).packed.dequantize() for t in prep.targets}
    overhead = {"gguf": 0, "hf": 0, "compressed-tensors": 16 * len(prep.targets)}
    for fmt, extra in overhead.items():
        report = export(prep, plan, exporters()[fmt], tmp_path / fmt)
        # Q4_0 and the mpq layout store the plan's bytes exactly; compressed-tensors adds a
        # 16-byte weight_shape per quantized layer.
        assert report.stored.total_bytes == report.predicted_bytes == report.mpq_bytes + extra, fmt
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    names, perms = _name_map(prep.loaded.model), _row_permutations(prep.loaded.model)
    for t in prep.targets:
        gt = tensors[gguf_name(names, f"{t.name}.weight")]
        assert gt.tensor_type.name == "Q4_0"
        got = gguf.quants.dequantize(gt.data, gt.tensor_type).reshape(t.shape)
        want = ref[t.name].numpy()
        if t.name in perms:
            want = want[perms[t.name].numpy()]
        assert (got == want).all(), t.name
    folder = tmp_path / "compressed-tensors"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(qc)
    (scheme,) = cfg.config_groups.values()
    state = load_file(str(folder / "model.safetensors"))
    compressor = BaseCompressor.get_value_from_registry(scheme.format or cfg.format)
    for t in prep.targets:
        local = {k[len(t.name) + 1 :]: v for k, v in state.items() if k.startswith(t.name + ".")}
        weight = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, ref[t.name].half()), t.name
    loaded = load_export(tmp_path / "hf")
    ids = torch.tensor([[1, 504, 2260, 282, 260, 3099]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, packed(ids).logits)
