"""Executor: packed modules store codes and compute what fake quantization computes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from mpq.executor import apply_plan, backends
from mpq.formats import QuantFormat
from mpq.kernels.modules import QuantEmbedding, QuantLinear
from mpq.plan import BitPlan, uniform_plan
from mpq.quant.quantize import fake_quantize
from mpq.targets import discover


@pytest.mark.parametrize("spec", ["2", "3:asym", "4:g32:asym", "6", "8:bf16", "16"])
def test_packed_equals_fake_on_tiny_llama(spec: str) -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat.parse(spec), "tiny")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = apply_plan(model, plan, targets, mode="packed")(ids).logits
        fake = apply_plan(model, plan, targets, mode="fake")(ids).logits
        fp = model(ids).logits
    torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)
    if spec != "16":
        assert not torch.allclose(packed, fp, atol=1e-4)  # quantization did something


def test_packed_modules_hold_codes_not_floats() -> None:
    model = tiny_llama()
    targets = discover(model)
    packed = apply_plan(model, uniform_plan(targets, QuantFormat(bits=3), "t"), targets)
    q = packed.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(q, QuantLinear)
    assert q.packed.qweight.dtype == torch.int32
    assert q.packed.qweight.shape == (64, 128 * 3 // 32)
    assert not any(
        p.dtype.is_floating_point and p.numel() >= 64 * 128 for p in q.state_dict().values()
    )
    assert set(backends(packed).values()) == {"reference"}


def test_tied_embedding_and_head_share_one_packed_tensor() -> None:
    model = tiny_llama(tie=True)
    targets = discover(model)
    packed = apply_plan(model, uniform_plan(targets, QuantFormat(bits=4), "t"), targets)
    emb = packed.get_submodule("model.embed_tokens")
    head = packed.get_submodule("lm_head")
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert emb.packed is head.packed


def test_embedding_rows_match_full_dequantization() -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat(bits=5, symmetric=False), "t")
    packed = apply_plan(model, plan, targets)
    emb = packed.get_submodule("model.embed_tokens")
    ids = torch.tensor([[3, 0, 95, 3]])
    expected = fake_quantize(model.model.embed_tokens.weight, plan["model.embed_tokens"])[ids]
    torch.testing.assert_close(emb(ids), expected, rtol=0, atol=0)


def test_mixed_plan_on_convnet(convnet: nn.Module) -> None:
    targets = discover(convnet)
    plan = BitPlan(
        {t.name: QuantFormat.parse(s) for t, s in zip(targets, ["8", "4:asym", "16"], strict=True)},
        "c",
    )
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = apply_plan(convnet, plan, targets)(x)
        b = apply_plan(convnet, plan, targets, mode="fake")(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_apply_plan_copies_unless_inplace() -> None:
    model = tiny_llama()
    targets = discover(model)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    apply_plan(model, uniform_plan(targets, QuantFormat(bits=2), "t"), targets, mode="fake")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    apply_plan(
        model, uniform_plan(targets, QuantFormat(bits=2), "t"), targets, mode="fake", inplace=True
    )
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
