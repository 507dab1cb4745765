"""Activation fake quantization (W+A plans) against a direct, per-element computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.kernels.modules import PackedWeight, QuantLinear
from mpq.plan import BitPlan, uniform_plan
from mpq.quant.act_quant import ActQuant, fake_quant_act
from mpq.targets import discover


def _direct(values: list[float], bits: int, symmetric: bool) -> list[float]:
    """One scale for ``values``, with plain Python floats (round half to even like torch)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = max(max(abs(v) for v in values) / qmax, 2.0**-126)
        return [min(max(round(v / s), -qmax - 1), qmax) * s for v in values]
    qmax = 2**bits - 1
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    s = max((hi - lo) / qmax, 2.0**-126)
    z = min(max(round(-lo / s), 0), qmax)
    return [(min(max(round(v / s) + z, 0), qmax) - z) * s for v in values]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_token_and_per_tensor_match_direct_computation(bits: int, symmetric: bool) -> None:
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(bits)).double() + 0.3
    tok = fake_quant_act(x, bits, symmetric=symmetric)
    for i in range(2):
        for j in range(3):
            want = _direct(x[i, j].tolist(), bits, symmetric)
            assert tok[i, j].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    ten = fake_quant_act(x, bits, granularity="tensor", symmetric=symmetric)
    want = _direct(x.reshape(-1).tolist(), bits, symmetric)
    assert ten.reshape(-1).tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    levels = len(torch.unique(tok[0, 0]))
    assert levels <= 2**bits


def test_conv_inputs_get_one_scale_per_pixel() -> None:
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    y = fake_quant_act(x, 3, channel_dim=1)
    for h in range(2):
        for w in range(2):
            want = _direct(x[0, :, h, w].tolist(), 3, False)
            assert y[0, :, h, w].tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_sixteen_bits_is_identity_and_bad_settings_are_refused() -> None:
    x = torch.randn(3, 5)
    assert fake_quant_act(x, 16) is x
    with pytest.raises(MpqError, match="act_bits=1"):
        fake_quant_act(x, 1)
    with pytest.raises(MpqError, match="granularity 'channel' is unknown"):
        ActQuant(granularity="channel")


def test_quantized_linear_quantizes_its_input() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    fmt = QuantFormat.parse("4:a4")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    q = QuantLinear(PackedWeight(w, fmt), None)
    expect = fake_quant_act(x, 4) @ q.packed.dequantize().T
    torch.testing.assert_close(q(x), expect, rtol=1e-6, atol=1e-6)
    qt = QuantLinear(PackedWeight(w, fmt), None, act=ActQuant("tensor", symmetric=True))
    expect_t = fake_quant_act(x, 4, granularity="tensor", symmetric=True) @ q.packed.dequantize().T
    torch.testing.assert_close(qt(x), expect_t, rtol=1e-6, atol=1e-6)


def test_packed_and_fake_agree_on_a_w4a8_plan(convnet: nn.Module) -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat.parse("4:g32:a8"), "tiny")
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    w_only = uniform_plan(targets, QuantFormat.parse("4:g32"), "tiny")
    with torch.no_grad():
        packed = apply_plan(model, plan, targets)(ids).logits
        fake = apply_plan(model, plan, targets, mode="fake")(ids).logits
        weights_only = apply_plan(model, w_only, targets)(ids).logits
    torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed, weights_only, atol=1e-6)  # the a8 did something
    ctargets = discover(convnet)
    cplan = BitPlan({t.name: QuantFormat.parse("8:a4") for t in ctargets}, "c")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = apply_plan(convnet, cplan, ctargets)(x)
        b = apply_plan(convnet, cplan, ctargets, mode="fake")(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(a.sum()))
