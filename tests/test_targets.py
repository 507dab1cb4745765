"""discover(): names in model order, filters, tie groups as data, shared weights once."""

from __future__ import annotations

import pytest
from conftest import tiny_llama

from mpq.errors import MpqError
from mpq.targets import TieRule, decisions, discover, find_target


def test_model_order_and_kinds() -> None:
    model = tiny_llama()
    names = [t.name for t in discover(model)]
    expected = ["model.embed_tokens"] + [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert names == expected


def test_tie_groups_come_from_rules() -> None:
    targets = discover(tiny_llama())
    groups = decisions(targets)
    assert [t.name.rsplit(".", 1)[1] for t in groups["model.layers.1.self_attn.qkv"]] == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    assert len(groups["model.layers.0.mlp.gate_up"]) == 2
    assert len(groups) == 1 + 2 * 4  # embedding + per block: qkv, o, gate_up, down
    no_ties = discover(tiny_llama(), tie_rules=())
    assert all(t.tie is None for t in no_ties)
    custom = discover(
        tiny_llama(), tie_rules=[TieRule(r"^model\.layers\.(?P<i>\d+)\.", "block{i}")]
    )
    assert len(decisions(custom)) == 1 + 2


def test_include_exclude_and_singleton_ties_dropped() -> None:
    targets = discover(tiny_llama(), include=[r"layers\.0\."], exclude=[r"k_proj", r"v_proj"])
    names = [t.name for t in targets]
    assert names[0] == "model.layers.0.self_attn.q_proj" and len(names) == 5
    assert find_target(targets, "model.layers.0.self_attn.q_proj").tie is None


def test_errors_name_the_fix() -> None:
    with pytest.raises(MpqError, match="loosen the patterns"):
        discover(tiny_llama(), include=["nothing-matches"])
    with pytest.raises(MpqError, match="not a valid regex"):
        discover(tiny_llama(), exclude=["("])
    with pytest.raises(MpqError, match="did you mean"):
        find_target(discover(tiny_llama()), "model.layers.0.mlp.down_prj")
