"""Cost oracles: hand-computed bits, and predicted bytes == bytes actually produced/written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from torch import nn

from mpq.cost import build_cost_model, tensor_bits, unique_tensors, weight_bits
from mpq.executor import apply_plan
from mpq.export.safetensors import save_packed, tensor_bytes_in_file
from mpq.formats import QuantFormat
from mpq.plan import BitPlan, uniform_plan
from mpq.targets import discover

SPECS = ["2", "3", "3:asym", "4:g32", "5:g16:asym:bf16", "6:asym", "7:fp32", "8", "16"]


def test_weight_bits_by_hand() -> None:
    # 10 x 33 weight, 3-bit per-channel symmetric: 99 bits/row -> 4 words -> 128 bits/row.
    assert weight_bits((10, 33), QuantFormat(bits=3)) == 10 * 128 + 10 * 16
    # Asymmetric adds one stream of 10 zero-points at 3 bits -> 30 bits -> 1 word.
    assert weight_bits((10, 33), QuantFormat(bits=3, symmetric=False)) == 10 * 128 + 10 * 16 + 32
    # 4 x 64, g32, 4-bit asym, fp32 scales: codes 4*8 words, 8 scales, 8 zeros at 4 bits = 1 word.
    fmt = QuantFormat(bits=4, group_size=32, symmetric=False, scale_dtype="float32")
    assert weight_bits((4, 64), fmt) == 4 * 8 * 32 + 8 * 32 + 32
    # Conv kernels are flattened per output channel; keep = fp16.
    assert weight_bits((8, 3, 3, 3), QuantFormat(bits=8)) == 8 * 7 * 32 + 8 * 16
    assert weight_bits((8, 3, 3, 3), QuantFormat(bits=16)) == 8 * 27 * 16


@pytest.mark.parametrize("spec", SPECS)
def test_predicted_bytes_equal_packed_state_dict_and_file(spec: str, tmp_path) -> None:
    model = tiny_llama(tie=True)
    targets = discover(model)
    cost = build_cost_model(model, targets, "tiny")
    plan = uniform_plan(targets, QuantFormat.parse(spec), "tiny")
    report = cost.plan_cost(plan)
    packed = apply_plan(model, plan, targets)
    actual = sum(tensor_bits(t) for t in unique_tensors(packed.state_dict()).values())
    assert report.total_bits == actual
    path = save_packed(packed, plan, tmp_path / "m.safetensors")
    assert tensor_bytes_in_file(path) == report.total_bytes


def test_mixed_plan_on_convnet_bytes_match(convnet: nn.Module) -> None:
    targets = discover(convnet)
    specs = ["4:asym", "16", "3"]
    plan = BitPlan({t.name: QuantFormat.parse(s) for t, s in zip(targets, specs, strict=True)}, "c")
    cost = build_cost_model(convnet, targets, "c", torch.zeros(1, 3, 8, 8))
    packed = apply_plan(convnet, plan, targets)
    actual = sum(tensor_bits(t) for t in unique_tensors(packed.state_dict()).values())
    assert cost.plan_cost(plan).total_bits == actual


def test_tied_weights_counted_once() -> None:
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    t_tied, t_untied = discover(tied), discover(untied)
    assert t_tied[0].aliases == ("lm_head",)
    assert len(t_untied) == len(t_tied) + 1
    c_tied = build_cost_model(tied, t_tied, "t")
    c_untied = build_cost_model(untied, t_untied, "u")
    emb = 96 * 64 * 32  # the shared table, in fp32 bits
    assert c_untied.fp_bits - c_tied.fp_bits == emb


def test_fixed_bits_count_every_non_target_tensor() -> None:
    model = tiny_llama()
    targets = discover(model, exclude=[r"mlp\."])
    cost = build_cost_model(model, targets, "t")
    excluded = sum(p.numel() * 32 for n, p in model.named_parameters() if ".mlp." in n)
    norms = sum(p.numel() * 32 for n, p in model.named_parameters() if "norm" in n)
    assert cost.fixed_bits == excluded + norms


def test_bops_by_hand() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    targets = discover(model)
    cost = build_cost_model(model, targets, "m", torch.zeros(3, 8))
    plan = BitPlan({"0": QuantFormat.parse("4:a8"), "2": QuantFormat.parse("16")}, "m")
    # MACs: 3 rows x 8 x 4 = 96 at 4x8 bits; 3 x 4 x 2 = 24 at 16x16 bits.
    assert cost.plan_cost(plan).bops == 96 * 4 * 8 + 24 * 16 * 16


def test_effective_bits_include_scales() -> None:
    model = nn.Sequential(nn.Linear(64, 4, bias=False))
    targets = discover(model)
    cost = build_cost_model(model, targets, "m")
    rep = cost.plan_cost(uniform_plan(targets, QuantFormat(bits=4), "m"))
    assert rep.effective_bits == pytest.approx(4 + 16 / 64)
    assert rep.total_bytes == (4 * 64 * 4 + 4 * 16) // 8


def test_a_container_storage_is_the_cost_column_of_the_problem() -> None:
    """``in_container`` swaps the bytes per (shape, format): the problem's bits/bytes columns,
    the plan's report and the budget limits all count the container's bytes."""
    from mpq.cost import PACKED, Storage, check_fit, over_budget, packed_bytes, to_limit
    from mpq.errors import MpqError
    from mpq.problem import build_problem
    from mpq.targets import decisions

    model = tiny_llama()
    targets = discover(model)
    cost = build_cost_model(model, targets, "t")
    assert cost.storage == PACKED
    extra = 100  # a toy container: mpq's bytes plus 100 bytes of bookkeeping per weight
    boxed = cost.in_container(Storage("toy", lambda s, f: packed_bytes(s, f) + extra))
    formats = [QuantFormat(4), QuantFormat(8)]
    mine, theirs = build_problem(cost, formats, {}), build_problem(boxed, formats, {})
    members = [[len(m)] for m in decisions(targets).values()]
    assert (theirs.costs["bytes"] == mine.costs["bytes"] + extra * np.array(members)).all()
    assert (theirs.costs["bits"] == mine.costs["bits"] + 8 * extra * np.array(members)).all()
    plan = uniform_plan(targets, QuantFormat(4), "t")
    ours, container = cost.plan_cost(plan), boxed.plan_cost(plan)
    assert container.total_bytes == ours.total_bytes + extra * len(targets)
    assert container.fixed_bits == ours.fixed_bits == cost.fixed_bytes * 8
    assert to_limit(boxed, "bytes", 1e6) == to_limit(cost, "bytes", 1e6)  # same fixed tensors
    budget = {"bytes": float(ours.total_bytes)}
    assert over_budget(ours, budget) == {}
    assert over_budget(container, budget) == {
        "bytes": (float(container.total_bytes), budget["bytes"])
    }
    with pytest.raises(MpqError, match="do not fit the budget"):
        check_fit("the toy container's weights", container, budget)


def test_fp_report_is_every_tensor_at_its_dtype() -> None:
    model = tiny_llama()
    cost = build_cost_model(model, discover(model), "t")
    fp = cost.fp_report()
    assert fp.effective_bits == fp.model_bits == 32.0  # an fp32 model
    assert fp.total_bits == cost.fp_bits
