"""Row-mixed formats: the spec, the row choice, exact storage, packed = fake, files, the table
(packing, files and containers also for column-mixed ones: tests/test_colmix.py has the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from mpq.cost import build_cost_model, tensor_bits, unique_tensors, weight_bits
from mpq.errors import MpqError
from mpq.executor import apply_plan, load_packed
from mpq.export.safetensors import save_packed, tensor_bytes_in_file
from mpq.formats import QuantFormat, hi_rows
from mpq.kernels.modules import ColMixLinear, RowMixLinear
from mpq.plan import uniform_plan
from mpq.quant.quantize import dequantize, quantize
from mpq.quant.rowmix import low_part, select_rows
from mpq.targets import discover

MIX = "3:g32:mse+4:g32:mse@25"


def test_spec_round_trips_and_plain_formats_keep_their_dict() -> None:
    for spec in (MIX, "3:g32:dq:mse+4:g32:nl:dq:mse@75", "2+8:asym@1", "4:a8+6:a8@50"):
        f = QuantFormat.parse(spec)
        assert QuantFormat.parse(f.spec()) == f
        assert QuantFormat.from_dict(f.to_dict()) == f
        assert f.low.hi is None and f.hi is not None and f.hi.hi is None
    plain = QuantFormat.parse("4:g32:nl:dq:mse")
    assert "hi" not in plain.to_dict() and "hi_pct" not in plain.to_dict()  # old keys stay valid
    assert plain.low is plain and plain.hi is None


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("3+4", "LOW\\+HIGH@PERCENT"),
        ("3+4@0", r"1\.\.99"),
        ("3+4@100", r"1\.\.99"),
        ("3+4@x", "LOW\\+HIGH@PERCENT"),
        ("3:gptq+4:gptq@50", "GPTQ"),
        ("3+4:mse@50", "same method"),
        ("4:g32+4:g32@50", "same format"),
        ("16+4@10", "must quantize"),
        ("3+4+5@5", "two parts"),
    ],
)
def test_malformed_row_mixed_specs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(MpqError, match=words):
        QuantFormat.parse(spec)


def test_hi_rows_rounds_half_up() -> None:
    f = QuantFormat.parse("3+4@25")
    assert [hi_rows(r, f) for r in (1, 2, 3, 4, 6, 10)] == [0, 1, 1, 1, 2, 3]
    assert hi_rows(576, QuantFormat.parse("3+4@50")) == 288
    assert hi_rows(10, QuantFormat.parse("3")) == 0


def test_each_row_is_its_part_and_the_rows_are_the_best_k() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=gen) * torch.rand(40, 1, generator=gen) * 3
    imp = torch.rand(64, generator=gen) + 0.1
    f = QuantFormat.parse(MIX)
    qt = quantize(w, f, importance=imp)
    assert qt.parts is not None
    mask = qt.parts.mask
    low = dequantize(quantize(w, f.low, importance=imp))
    high = dequantize(quantize(w, f.hi, importance=imp))
    got = dequantize(qt)
    assert int(mask.sum()) == hi_rows(40, f) == 10
    assert torch.equal(got[mask], high[mask]) and torch.equal(got[~mask], low[~mask])
    # oracle: the weighted error each row saves, by brute force per row
    gain = torch.tensor(
        [float((((low[r] - w[r]) ** 2 - (high[r] - w[r]) ** 2) * imp).sum()) for r in range(40)]
    )
    assert float(gain[mask].min()) >= float(gain[~mask].max()) - 1e-6 * float(gain.abs().max())
    # the chosen rows lower the weighted error against any other choice of 10 rows
    err = float((((got - w) ** 2) * imp).sum())
    other = torch.where(torch.roll(mask, 1)[:, None], high, low)
    assert err <= float((((other - w) ** 2) * imp).sum()) + 1e-9


def test_ties_go_to_the_lower_row_index() -> None:
    w = torch.ones(6, 4)
    mask = select_rows(w, torch.zeros(6, 4), torch.ones(6, 4), 2, None)
    assert mask.tolist() == [True, True, False, False, False, False]


def test_weight_bits_are_the_parts_plus_the_row_mask() -> None:
    f = QuantFormat.parse("3:g32:dq+4:g32:asym:dq@25")
    rows, cols = 40, 96
    k = hi_rows(rows, f)
    mask_bits = 2 * 32  # 40 one-bit entries in 32-bit words
    want = weight_bits((rows - k, cols), f.low) + weight_bits((k, cols), f.hi) + mask_bits
    assert weight_bits((rows, cols), f) == want


COL_MIX = "3:g16:mse+8:g16:mse#25"


@pytest.mark.parametrize(
    "spec",
    [MIX, "3:g32:dq:mse+4:g32:nl:dq:mse@50", "2:asym+8@75",
     COL_MIX, "3:g16:dq:mse+4:g16:nl:dq:mse#50", "2:asym+8#30"],
)  # fmt: skip
def test_packed_equals_fake_and_bytes_match_the_cost(spec: str, tmp_path: Path) -> None:
    model = tiny_llama(tie=True)
    targets = [t for t in discover(model) if t.kind == "linear"]
    fmt = QuantFormat.parse(spec)
    plan = uniform_plan(targets, fmt, "tiny")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    packed = apply_plan(model, plan, targets, mode="packed")
    with torch.no_grad():
        fake_out = apply_plan(model, plan, targets, mode="fake")(ids).logits
        packed_out = packed(ids).logits
    torch.testing.assert_close(packed_out, fake_out, rtol=1e-5, atol=1e-5)
    kind = ColMixLinear if fmt.hi_axis == "cols" else RowMixLinear
    assert type(packed.get_submodule("model.layers.0.mlp.down_proj")) is kind
    # exact budget: the cost model's bits are the packed tensors' and the file's
    cost = build_cost_model(model, targets, "tiny")
    report = cost.plan_cost(plan)
    actual = sum(tensor_bits(t) for t in unique_tensors(packed.state_dict()).values())
    assert report.total_bits == actual
    path = save_packed(packed, plan, tmp_path / "m.safetensors")
    assert tensor_bytes_in_file(path) == report.total_bytes
    loaded = load_packed(model, targets, path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, packed_out, rtol=0, atol=0)


@pytest.mark.parametrize(("spec", "buffer"), [(MIX, "rowmask"), (COL_MIX, "colmask")])
def test_an_edited_mask_is_refused(spec: str, buffer: str) -> None:
    model = tiny_llama(tie=True)
    targets = [t for t in discover(model) if t.kind == "linear"]
    plan = uniform_plan(targets, QuantFormat.parse(spec), "tiny")
    packed = apply_plan(model, plan, targets, mode="packed")
    state = {k: v.clone() for k, v in packed.state_dict().items()}
    key = f"model.layers.0.mlp.down_proj.{buffer}"
    state[key][0, 0] ^= 1  # move row (column) 0 into or out of the high part
    with pytest.raises(MpqError, match=buffer):
        load_packed(model, targets, state, plan)


def test_bias_follows_its_rows() -> None:
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(32, 10))
    targets = discover(lin)
    plan = uniform_plan(targets, QuantFormat.parse("3:asym+6:asym@30"), "lin")
    x = torch.randn(4, 32)
    with torch.no_grad():
        packed = apply_plan(lin, plan, targets)(x)
        fake = apply_plan(lin, plan, targets, mode="fake")(x)
    torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)


def test_row_mixed_embeddings_are_packed_only_in_fake_mode() -> None:
    model = tiny_llama(tie=True)
    targets = discover(model)
    plan = uniform_plan(targets, QuantFormat.parse("3:g32+4:g32@50"), "tiny")
    apply_plan(model, plan, targets, mode="fake")  # every target, the tied embedding included
    with pytest.raises(MpqError, match="Linear layers only"):
        apply_plan(model, plan, targets, mode="packed")


def test_memoized_parts_give_the_same_weights() -> None:
    model = tiny_llama(tie=True)
    targets = [t for t in discover(model) if t.kind == "linear"]
    memo: dict = {}
    for spec in ("3:g32+4:g32@25", "3:g32+4:g32@75", "3:g32"):
        plan = uniform_plan(targets, QuantFormat.parse(spec), "tiny")
        a = apply_plan(model, plan, targets, mode="fake", memo=memo)
        b = apply_plan(model, plan, targets, mode="fake")
        for t in targets:
            assert torch.equal(a.get_submodule(t.name).weight, b.get_submodule(t.name).weight)
    # the two percents shared the whole-weight parts
    assert ("model.layers.0.mlp.up_proj", "4:g32") in memo


@pytest.mark.parametrize("share", ["@50", "#10"])
def test_containers_with_one_type_per_tensor_refuse_mixed_formats(share: str) -> None:
    from mpq.export.compressed import supported
    from mpq.export.gguf_writer import gguf_type_name
    from mpq.export.llamacpp import LLAMACPP_EXPORTER

    f = QuantFormat.parse(f"4:g32:asym:dq+6:g32:dq{share}")
    assert gguf_type_name(f) is None and gguf_type_name(f.low) is not None
    assert not supported(QuantFormat.parse(f"4:g32+8:g32{share}"))
    assert not LLAMACPP_EXPORTER.maps_format(f)


def test_low_part_is_a_plain_weight_of_the_low_format() -> None:
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    qt = quantize(w, QuantFormat.parse("3:g32:dq+5:g32:dq@50"))
    low = low_part(qt)
    assert low.fmt == QuantFormat.parse("3:g32:dq") and low.shape == (6, 64) and low.parts is None


def test_anchored_table_carries_damage_by_the_rows_output_error() -> None:
    """The anchored measured table prices a row-mixed format as the anchor's damage times its
    output-error ratio, and that error is the sum of each part's rows' errors (the oracle)."""
    from mpq.layerstats import collect_input_stats
    from mpq.sensitivity.base import Context
    from mpq.sensitivity.measured import output_error, output_errors

    model = tiny_llama(tie=True)
    targets = [t for t in discover(model) if t.kind == "linear"]
    t = next(x for x in targets if x.name.endswith("layers.1.mlp.down_proj"))
    batches = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))]
    stats = collect_input_stats(model, [t.name], batches, full=[t.name])
    ctx = Context(model=model, task=None, calib=None, formats=(), stats=stats)  # type: ignore[arg-type]
    f = QuantFormat.parse("3:g32:mse+4:g32:mse@50")
    errs = output_errors(ctx, t, [f.low, f.hi, f])
    w = model.get_submodule(t.name).weight.detach()
    st = stats[t.name]
    qt = quantize(w, f, importance=st.diag)
    assert qt.parts is not None
    m = qt.parts.mask
    lo = dequantize(quantize(w, f.low, importance=st.diag)) - w
    hi = dequantize(quantize(w, f.hi, importance=st.diag)) - w
    want = output_error(lo[~m], st.diag, st.full) + output_error(hi[m], st.diag, st.full)
    assert errs[f.spec()] == pytest.approx(want, rel=1e-9)
    assert errs[f.hi.spec()] < errs[f.spec()] < errs[f.low.spec()]


@pytest.mark.parametrize("spec", [MIX, COL_MIX])
def test_the_forward_follows_a_mask_loaded_after_it_ran(spec: str) -> None:
    """The mixed layers keep their mask's indices between calls; a mask loaded in place later
    (load_state_dict) must be seen. Oracles: a layer built with that mask from the start
    (exactly), and the fake-quantized dense layer of the same weights."""
    model = tiny_llama(tie=True)
    targets = [t for t in discover(model) if t.kind == "linear"]
    plan = uniform_plan(targets, QuantFormat.parse(spec), "tiny")
    packed = apply_plan(model, plan, targets, mode="packed")
    other_model = tiny_llama(tie=True, seed=5)
    other = apply_plan(other_model, plan, targets, mode="packed")
    dense = apply_plan(other_model, plan, targets, mode="fake")
    name = "model.layers.0.mlp.down_proj"
    layer, fresh = packed.get_submodule(name), other.get_submodule(name)
    assert not torch.equal(layer.mask(), fresh.mask())  # the two models chose other units
    x = torch.randn(3, dense.get_submodule(name).in_features)
    with torch.no_grad():
        layer(x)  # the first mask's indices are now held
        layer.load_state_dict(fresh.state_dict())
        got = layer(x)
        assert torch.equal(got, fresh(x))
        torch.testing.assert_close(got, dense.get_submodule(name)(x), rtol=1e-5, atol=1e-5)
