"""The report's additive-prediction section: the table's sum of single-layer damages of each
plan, next to the plan's measured held-out KL (brute-force sums on a hand-made table)."""

from __future__ import annotations

import math

import pytest

from mpq.analysis import additive_prediction
from mpq.formats import QuantFormat
from mpq.plan import BitPlan
from mpq.report import PlanEntry, additive_section
from mpq.sensitivity.table import SensitivityTable

F3, F4 = QuantFormat.parse("3:g32"), QuantFormat.parse("4:g32")
KEEP = QuantFormat.parse("16")
TABLE = SensitivityTable(
    estimator="measured",
    model_id="m",
    data_id="wiki",
    distortions={"a": {"3:g32": 0.5, "4:g32": 0.1}, "b": {"3:g32": 0.25, "4:g32": 0.05}},
)


def _plan(**fmts: QuantFormat) -> BitPlan:
    return BitPlan(formats=fmts, model_id="m")


def test_additive_prediction_sums_the_plans_single_layer_damages() -> None:
    assert additive_prediction(TABLE, {"a": F3, "b": F4}) == pytest.approx(0.55)
    assert additive_prediction(TABLE, {"a": F4, "b": KEEP}) == pytest.approx(0.1)  # kept: 0
    assert additive_prediction(TABLE, {"a": F4, "c": F3}) == pytest.approx(0.1)  # unscored
    assert math.isnan(additive_prediction(TABLE, {"a": QuantFormat.parse("5:g32")}))


def test_additive_section_tables_prediction_against_measured_kl() -> None:
    uni = PlanEntry("uniform:3:g32", "uniform", _plan(a=F3, b=F3), "")
    mixed = PlanEntry("ilp/measured@bits=3.5", "ilp/measured", _plan(a=F4, b=F3), "bits=3.5", 0)
    other = PlanEntry("ilp/fisher@bits=3.5", "ilp/fisher", _plan(a=F3, b=F4), "bits=3.5", 0)
    outside = PlanEntry("uniform:5:g32", "uniform", _plan(a=QuantFormat.parse("5:g32")), "")
    rows = [
        {"plan": "uniform:3:g32", "seeds": "", "data": "wiki", "kl": 0.9, "kl_se": 0.01},
        {"plan": "ilp/measured@bits=3.5", "seeds": "0", "data": "wiki", "kl": 0.7, "kl_se": 0.02},
        {"plan": "uniform:3:g32", "seeds": "", "data": "bbc", "kl": 0.6, "kl_se": 0.01},
    ]
    md = additive_section({("measured", 0): TABLE}, [uni, mixed, other, outside], rows)
    text = "\n".join(md)
    assert "| plan | table sum | wiki KL ± 1.96 se | measured / sum | bbc KL ± 1.96 se |" in text
    lines = {ln.split("|")[1].strip(): ln for ln in md if ln.startswith("| ")}
    assert "| 0.75 | 0.9 ± 0.02 | 1.2 | 0.6 ± 0.02 | 0.8 |" in lines["uniform:3:g32"]
    assert "| 0.35 | 0.7 ± 0.039 | 2 | nan ± nan | nan |" in lines["ilp/measured@bits=3.5"]
    assert "ilp/fisher@bits=3.5" not in lines  # another table's plan
    assert "uniform:5:g32" not in lines  # a format the table does not score
    assert additive_section({}, [uni], rows) == []
