"""BitPlan: exact JSON round trips and validation against a model, with clear errors."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from conftest import tiny_llama

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.plan import BitPlan, parse_plan_arg, uniform_plan
from mpq.targets import discover


def _mixed_plan() -> tuple[BitPlan, list]:
    targets = discover(tiny_llama())
    fmts = {}
    for i, t in enumerate(targets):
        fmts[t.name] = QuantFormat.parse(
            ["3:asym", "4:g32", "8:bf16:a8", "16"][zlib.crc32(t.decision.encode()) % 4]
        )
        del i
    plan = BitPlan(
        fmts,
        "tiny",
        solver="greedy",
        objective="kl",
        budget={"bits": 4.25},
        meta={"status": "feasible", "note": [1, 2]},
    )
    return plan, targets


def test_round_trip_exact(tmp_path) -> None:
    plan, targets = _mixed_plan()
    assert BitPlan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "p.json")
    loaded = BitPlan.load(path)
    assert loaded == plan
    assert list(loaded.formats) == [t.name for t in targets]  # model order survives
    assert loaded.to_json() == plan.to_json()
    loaded.validate(targets)


def test_plan_is_frozen() -> None:
    plan, _ = _mixed_plan()
    with pytest.raises(TypeError):
        plan.formats["x"] = QuantFormat(bits=4)  # type: ignore[index]
    with pytest.raises(AttributeError):
        plan.model_id = "other"  # type: ignore[misc]


def test_uniform_spec_on_command_line() -> None:
    targets = discover(tiny_llama())
    plan = parse_plan_arg("uniform:4:g32:asym", targets, "tiny")
    assert set(plan.formats.values()) == {QuantFormat(bits=4, group_size=32, symmetric=False)}
    assert len(plan.formats) == len(targets)


def test_validation_lists_every_problem() -> None:
    targets = discover(tiny_llama())
    fmts = {t.name: QuantFormat(bits=4) for t in targets}
    fmts["model.layers.0.self_attn.k_proj"] = QuantFormat(bits=8)  # splits a tie group
    fmts["model.layers.0.mlp.down_prj"] = QuantFormat(bits=4)  # typo
    del fmts["model.layers.1.mlp.down_proj"]
    fmts["model.layers.0.mlp.gate_proj"] = QuantFormat(bits=4, group_size=48)
    fmts["model.layers.0.mlp.up_proj"] = QuantFormat(bits=4, group_size=48)
    with pytest.raises(MpqError) as err:
        BitPlan(fmts, "tiny").validate(targets)
    msg = str(err.value)
    assert "model.layers.0.self_attn.qkv" in msg
    assert "'model.layers.0.mlp.down_prj'" in msg and "did you mean" in msg
    assert "no format for 1 target" in msg
    assert "group size 48 does not divide" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a plan"),
        ('{"_type": "BitPlan", "_version": 99, "_data": {}}', "version 99"),
        ('{"_type": "BitPlan", "_version": 1}', 'no "_data" object'),
        ('{"_type": "BitPlan", "_version": 1, "_data": {"model_id": "m"}}', "_data.formats"),
        (
            '{"_type": "BitPlan", "_version": 1, "_data": {"model_id": "m", '
            '"formats": {"a": {"bits": 1}}}}',
            "bits=1 is not supported",
        ),
        (
            '{"_type": "BitPlan", "_version": 1, "_data": {"model_id": "m", '
            '"formats": {"a": {"bits": 4, "colour": 2}}}}',
            "unknown keys",
        ),
    ],
)
def test_malformed_plans(text: str, expected: str) -> None:
    with pytest.raises(MpqError, match=expected):
        BitPlan.from_json(text)


def test_uniform_plan_json_shape() -> None:
    targets = discover(tiny_llama())
    obj = json.loads(uniform_plan(targets, QuantFormat(bits=4), "tiny").to_json())
    assert obj["_type"] == "BitPlan" and obj["_version"] == 1
    assert obj["_data"]["formats"][targets[0].name]["bits"] == 4


def test_plan_for_another_model_is_refused(tmp_path) -> None:
    targets = discover(tiny_llama())
    path = uniform_plan(targets, QuantFormat(bits=4), "other-model").save(tmp_path / "p.json")
    with pytest.raises(MpqError, match="was made for model 'other-model', not 'tiny'"):
        parse_plan_arg(str(path), targets, "tiny")
    assert len(parse_plan_arg(str(path), targets, "other-model").formats) == len(targets)


def test_every_versioned_file_refuses_malformed_json(tmp_path: Path) -> None:
    """Plans, sensitivity tables and latency tables share one reader (mpq.envelope)."""
    from mpq.latency import LatencyTable
    from mpq.sensitivity.table import SensitivityTable

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MpqError, match="latency table is not valid JSON"):
        LatencyTable.from_json(bad.read_text())
    with pytest.raises(MpqError, match=r"sensitivity table '.*bad.json' is not valid JSON"):
        SensitivityTable.load(bad)
    with pytest.raises(MpqError, match="not a sensitivity table"):
        SensitivityTable.from_dict({"_type": "BitPlan", "_version": 1, "_data": {}})
