"""Column-mixed formats: the spec, the column choice, exact storage, the bias, the table (packed
= fake, files and containers: tests/test_rowmix.py, parametrized over both axes)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from mpq.cost import weight_bits
from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.formats import QuantFormat, check_format, hi_cols, hi_rows
from mpq.plan import uniform_plan
from mpq.quant.quantize import dequantize, quantize
from mpq.quant.rowmix import low_part, select_cols
from mpq.targets import discover

MIX = "3:g16:mse+8:g16:mse#25"


def test_spec_round_trips_and_row_mixed_dicts_keep_their_keys() -> None:
    for spec in (MIX, "3:g32:dq:mse+4:g32:nl:dq:mse#11", "2+8:asym#1"):
        f = QuantFormat.parse(spec)
        assert f.hi_axis == "cols" and f.spec() == QuantFormat.parse(spec).spec()
        assert QuantFormat.parse(f.spec()) == f
        assert QuantFormat.from_dict(f.to_dict()) == f
        assert f.low.hi is None and f.low.hi_axis == "rows"
    rows = QuantFormat.parse("3:g32+4:g32@25")
    assert rows.hi_axis == "rows" and "hi_axis" not in rows.to_dict()  # old plans stay valid
    assert rows != QuantFormat.parse("3:g32+4:g32#25")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("3+4#0", r"column percent after '#' must be 1\.\.99"),
        ("3+4#x", "LOW\\+HIGH#PERCENT"),
        ("3+4@5#5", "LOW\\+HIGH#PERCENT"),
        ("3:gptq+4:gptq#50", "GPTQ"),
    ],
)
def test_malformed_column_mixed_specs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(MpqError, match=words):
        QuantFormat.parse(spec)


def test_hi_cols_takes_whole_groups_of_both_parts() -> None:
    f = QuantFormat.parse("3:g32+4:g32#11")
    assert hi_cols(576, f) == 64 and hi_cols(1536, f) == 160  # 63.4 -> 2 groups, 169 -> 5
    assert hi_cols(64, f) == 32  # at least one group, at most all but one
    assert hi_cols(96, QuantFormat.parse("3:g32+4:g32#99")) == 64
    assert hi_cols(576, QuantFormat.parse("3:g16+4:g32#11")) == 64  # lcm(16, 32) = 32
    assert hi_rows(576, f) == 0 and hi_cols(576, QuantFormat.parse("3+4@50")) == 0
    with pytest.raises(MpqError, match="steps of 32"):
        check_format((8, 48), f)  # 48 columns: not whole groups
    with pytest.raises(MpqError, match="at least one"):
        check_format((8, 32), f)


def test_each_column_is_its_part_and_the_columns_are_the_worst_at_low() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 128, generator=gen) * (torch.rand(1, 128, generator=gen) * 3 + 0.1)
    imp = torch.rand(128, generator=gen) + 0.1
    f = QuantFormat.parse(MIX)
    qt = quantize(w, f, importance=imp)
    assert qt.parts is not None
    mask = qt.parts.mask
    assert int(mask.sum()) == hi_cols(128, f) == 32
    got = dequantize(qt)
    # each part is its columns quantized alone, at its format, with their importance
    lo = dequantize(quantize(w[:, ~mask].contiguous(), f.low, importance=imp[~mask]))
    hi = dequantize(quantize(w[:, mask].contiguous(), f.hi, importance=imp[mask]))
    assert torch.equal(got[:, ~mask], lo) and torch.equal(got[:, mask], hi)
    # oracle: the chosen columns have the largest weighted error at the low format
    low_whole = dequantize(quantize(w, f.low, importance=imp))
    err = torch.tensor(
        [float(((low_whole[:, j] - w[:, j]) ** 2).sum() * imp[j]) for j in range(128)]
    )
    assert float(err[mask].min()) >= float(err[~mask].max()) - 1e-6 * float(err.max())
    # and the mix lowers the weighted error below the low format's
    assert float((((got - w) ** 2) * imp).sum()) < float((((low_whole - w) ** 2) * imp).sum())


def test_ties_go_to_the_lower_column_index() -> None:
    mask = select_cols(torch.ones(3, 6), torch.zeros(3, 6), 2, None)
    assert mask.tolist() == [True, True, False, False, False, False]


def test_weight_bits_are_the_parts_plus_the_column_mask() -> None:
    f = QuantFormat.parse("3:g32:dq+4:g32:asym:dq#25")
    rows, cols = 40, 576
    k = hi_cols(cols, f)
    mask_bits = 18 * 32  # 576 one-bit entries in 32-bit words
    want = weight_bits((rows, cols - k), f.low) + weight_bits((rows, k), f.hi) + mask_bits
    assert k == 160 and weight_bits((rows, cols), f) == want


def test_low_part_is_a_plain_weight_of_the_low_format() -> None:
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    qt = quantize(w, QuantFormat.parse("3:g16:dq+5:g16:dq#25"))
    low = low_part(qt)
    assert low.fmt == QuantFormat.parse("3:g16:dq") and low.shape == (12, 48) and low.parts is None


def test_the_bias_is_added_once() -> None:
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 10))
    targets = discover(lin)
    plan = uniform_plan(targets, QuantFormat.parse("3:g16:asym+6:g16:asym#30"), "lin")
    x = torch.randn(4, 64)
    with torch.no_grad():
        packed = apply_plan(lin, plan, targets)(x)
        fake = apply_plan(lin, plan, targets, mode="fake")(x)
    torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)


def test_anchored_table_prices_column_mixes_by_their_output_error() -> None:
    """The measured table's output error of a column-mixed format is ``tr(dW H dW^T)`` of the
    assembled weight (oracle: the weight built from the two parts by hand)."""
    from mpq.layerstats import collect_input_stats
    from mpq.sensitivity.base import Context
    from mpq.sensitivity.measured import output_error, output_errors

    model = tiny_llama(tie=True)
    targets = [t for t in discover(model) if t.kind == "linear"]
    t = next(x for x in targets if x.name.endswith("layers.1.mlp.down_proj"))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    stats = collect_input_stats(model, [t.name], [ids], full=[t.name])
    ctx = Context(model=model, task=None, calib=None, formats=(), stats=stats)  # type: ignore[arg-type]
    f = QuantFormat.parse("3:g16:mse+8:g16:mse#25")
    w = model.get_submodule(t.name).weight.detach()
    st = stats[t.name]
    got = output_errors(ctx, t, [f.low, f])
    qt = quantize(w, f, importance=st.diag)
    assert qt.parts is not None
    want = output_error(dequantize(qt) - w, st.diag, st.full)
    assert got[f.spec()] == pytest.approx(want, rel=1e-9)
    assert got[f.spec()] < got[f.low.spec()]


def test_report_records_name_the_axis_of_column_mixes_only() -> None:
    """Report folders made before column-mixed formats existed stay claimable: the config
    record carries ``hi_axis`` for column-mixed formats only."""
    from mpq.compare import config_record
    from mpq.config import load_config

    fmts = config_record(load_config("experiments/configs/smollm2.toml"))["formats"]
    assert [f.get("hi_axis") for f in fmts if "hi_axis" in f] == ["cols"] * 3
    assert all("hi_axis" not in f for f in fmts if "hi" not in f)
    old = config_record(load_config("experiments/configs/smollm2_tied.toml"))["formats"]
    assert not any("hi_axis" in f for f in old)
