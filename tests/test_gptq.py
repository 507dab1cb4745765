"""GPTQ oracles: beats round-to-nearest on correlated inputs at every width, equals it when the
inputs are uncorrelated, and its result is exactly what the packed storage holds."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from mpq.errors import MpqError
from mpq.executor import apply_plan, collect_hessians
from mpq.formats import QuantFormat
from mpq.kernels.modules import PackedWeight
from mpq.plan import BitPlan
from mpq.quant.gptq import GPTQConfig, gptq_quantize
from mpq.quant.quantize import dequantize, fake_quantize, quantize
from mpq.targets import discover


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight and inputs with strongly correlated, unevenly scaled features."""
    g = torch.Generator().manual_seed(seed)
    d, rows, n = 64, 24, 512
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = (torch.randn(n, d, generator=g) @ mix + 0.05 * torch.randn(n, d, generator=g)) * (
        0.2 + 2 * torch.rand(d, generator=g)
    )
    w = torch.randn(rows, d, generator=g)
    return w, x, x.T.double() @ x.double() / n


def _out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x.double() @ (w.double() - wq.double()).T).norm())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("suffix", ["", ":g32:asym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_at_every_width(
    bits: int, suffix: str, act_order: bool
) -> None:
    w, x, h = _layer(bits)
    fmt = QuantFormat.parse(f"{bits}{suffix}:gptq")
    res = gptq_quantize(w, h, fmt, act_order=act_order)
    rtn = fake_quantize(w, QuantFormat.parse(f"{bits}{suffix}"))
    assert _out_err(x, w, dequantize(res.quantized)) < _out_err(x, w, rtn)
    assert res.loss > 0 and (res.perm is not None) == act_order


@pytest.mark.parametrize("spec", ["3:gptq", "4:g32:asym:gptq", "5:g16:bf16:gptq", "8:asym:gptq"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_result_is_exactly_representable_in_packed_storage(spec: str, act_order: bool) -> None:
    w, _, h = _layer(1)
    qt = gptq_quantize(w, h, QuantFormat.parse(spec), act_order=act_order).quantized
    packed = PackedWeight.from_quantized(qt)
    assert torch.equal(packed.codes(), qt.codes)
    assert torch.equal(packed.dequantize(), dequantize(qt))
    assert qt.scales.dtype == packed.scales.dtype
    assert (
        packed.scales.shape
        == quantize(w, QuantFormat.parse(spec.replace(":gptq", ""))).scales.shape
    )


@pytest.mark.parametrize("spec", ["4", "3:g32:asym", "4:g32:nl"])
@pytest.mark.parametrize("grid", ["rtn", "mse"])
def test_uncorrelated_inputs_give_the_grid_rule_alone(spec: str, grid: str) -> None:
    """H = I: no error to spread, so GPTQ is its grid rule (rtn, or the unweighted mse search:
    the importance is H's diagonal, all ones) with nearest codes."""
    w, _, _ = _layer(2)
    res = gptq_quantize(w, torch.eye(w.shape[1]), QuantFormat.parse(spec + ":gptq"), grid=grid)
    alone = quantize(w, QuantFormat.parse(spec if grid == "rtn" else spec + ":mse"))
    assert torch.equal(res.quantized.codes, alone.codes)
    assert torch.equal(res.quantized.scales, alone.scales)


def test_dead_inputs_get_zero_weight_and_bad_input_is_refused() -> None:
    w, _, h = _layer(3)
    h[5, :] = 0
    h[:, 5] = 0
    qt = gptq_quantize(w, h, QuantFormat.parse("4:gptq")).quantized
    assert float(dequantize(qt)[:, 5].abs().max()) == 0.0
    with pytest.raises(MpqError, match=r"Hessian has shape \(3, 3\), expected \(64, 64\)"):
        gptq_quantize(w, torch.eye(3), QuantFormat.parse("4:gptq"))
    with pytest.raises(MpqError, match="needs the Hessian of the layer's inputs"):
        quantize(w, QuantFormat.parse("4:gptq"))
    with pytest.raises(MpqError, match="damp"):
        GPTQConfig(damp=-1.0)


def _gptq_plan(targets: list, spec: str = "4:g32:gptq") -> BitPlan:
    fmts = {t.name: QuantFormat.parse(spec if t.kind == "linear" else "4:g32") for t in targets}
    return BitPlan(fmts, "tiny")


def test_executor_collects_hessians_and_applies_gptq() -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = _gptq_plan(targets)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(2)]
    with pytest.raises(MpqError, match="no calibration data"):
        apply_plan(model, plan, targets)
    packed = apply_plan(model, plan, targets, calib=calib)
    fake = apply_plan(model, plan, targets, mode="fake", calib=calib)
    ids = torch.randint(0, 96, (1, 10), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, fake(ids).logits, rtol=1e-5, atol=1e-5)
    # Layer-level: GPTQ's output error on the calibration inputs is below RTN's.
    name = "model.layers.0.mlp.down_proj"
    h = collect_hessians(model, [name], calib)[name]
    w = model.get_submodule(name).weight.detach()
    wg = packed.get_submodule(name).packed.dequantize()
    wr = fake_quantize(w, QuantFormat.parse("4:g32"))
    dg, dr = (w - wg).double(), (w - wr).double()
    assert float(torch.trace(dg @ h @ dg.T)) < float(torch.trace(dr @ h @ dr.T))


def test_gptq_on_an_embedding_is_refused() -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = BitPlan({t.name: QuantFormat.parse("4:gptq") for t in targets}, "tiny")
    with pytest.raises(MpqError, match="embed_tokens: GPTQ applies to Linear layers"):
        apply_plan(model, plan, targets, calib=[torch.zeros(1, 4, dtype=torch.long)])


@pytest.mark.parametrize("grid", ["rtn", "mse"])
def test_rows_are_independent_problems(grid: str) -> None:
    """GPTQ's error feedback stays within a row (``W[r, j:] -= err_r * Hinv[j, j:]``) and each
    row's grid is its own: quantizing any subset of rows gives those rows' codes exactly. So a
    per-output-row weight on the objective ``sum_r lambda_r dw_r^T H dw_r`` cannot change the
    result: each row's argmin is the same for any ``lambda_r > 0``."""
    w, _, h = _layer(4)
    fmt = QuantFormat.parse("4:g32:gptq")
    whole = gptq_quantize(w, h, fmt, grid=grid).quantized
    rows = torch.tensor([3, 0, 17, 9])
    part = gptq_quantize(w[rows], h, fmt, grid=grid).quantized
    assert torch.equal(part.codes, whole.codes[rows])
    assert torch.equal(part.scales, whole.scales[rows])
