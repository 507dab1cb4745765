"""Preconditioning (scale folding, AWQ): exact equivalence, where scales fold, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.models import LoadedModel
from mpq.pipeline import Prepared
from mpq.plan import BitPlan, uniform_plan
from mpq.precondition import (
    MIN_AWQ_TOKENS,
    RECORD_VERSION,
    PreconditionRecord,
    PreconditionSpec,
    plan_folds,
    precondition_model,
    record_of,
    spec_from_plan,
)
from mpq.prepared import precondition
from mpq.targets import discover

torch.set_num_threads(1)

SF = PreconditionSpec("scale_folding", alpha=0.5)
AWQ = PreconditionSpec("awq", fmt="3:asym", n_grid=10)


def _calib(n: int = 4, t: int = 64, seed: int = 0) -> list[torch.Tensor]:
    ids = torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))
    return list(ids.split(1))


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(7))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("spec", [SF, AWQ], ids=["scale_folding", "awq"])
def test_power_of_two_scales_are_exact_and_the_input_is_untouched(
    tie: bool, spec: PreconditionSpec
) -> None:
    model = tiny_llama(tie=tie)
    before = _state(model)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        exact = precondition_model(model, PreconditionSpec(**{**_kw(spec), "pow2": True}), _calib())
        close = precondition_model(model, spec, _calib())
        assert torch.equal(exact.model(ids).logits, ref)  # bit-identical
        torch.testing.assert_close(close.model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The transform really changed the weights (it is not a copy of the input).
    w0 = before["model.layers.0.self_attn.o_proj.weight"]
    assert not torch.equal(close.model.state_dict()["model.layers.0.self_attn.o_proj.weight"], w0)


def _kw(spec: PreconditionSpec) -> dict[str, object]:
    return {
        "method": spec.method,
        "alpha": spec.alpha,
        "fmt": spec.fmt,
        "n_grid": spec.n_grid,
    }


def test_where_scales_fold_and_what_is_reported_not_folded() -> None:
    tied = precondition_model(tiny_llama(tie=True), SF, _calib()).report
    groups = sorted({e.group for e in tied.folded})
    assert groups == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    qkv = next(e for e in tied.folded if e.group == "attn_in")
    assert qkv.prev == "model.layers.0.input_layernorm"
    assert qkv.layers[0].endswith("q_proj") and len(qkv.layers) == 3
    reasons = dict(tied.not_folded)
    assert set(reasons) == {"model.embed_tokens", "lm_head"}
    assert "tied" in reasons["lm_head"] and "embed_tokens" in reasons["lm_head"]
    assert any(line.startswith("lm_head: not folded: ") for line in tied.lines())
    # Untied: the final norm takes lm_head's scale.
    untied = precondition_model(tiny_llama(tie=False), SF, _calib()).report
    head = [e for e in untied.folded if e.group == "head"]
    assert [(e.prev, e.layers) for e in head] == [("model.norm", ("lm_head",))]
    assert dict(untied.not_folded).keys() == {"model.embed_tokens"}
    # Every Linear of the model is either folded or listed with a reason.
    model = tiny_llama(tie=True)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    covered = {n for e in tied.folded for n in e.layers} | set(reasons)
    assert linears <= covered


def test_grouped_query_attention_scale_is_repeated_over_query_heads() -> None:
    model = tiny_llama()  # 4 heads, 2 kv heads
    folds, _ = plan_folds(model)
    attn_out = next(g for g in folds if g.group == "attn_out")
    assert (attn_out.n_rep, attn_out.head_dim) == (2, 16)
    out = precondition_model(model, SF, _calib()).model
    o0 = model.get_submodule("model.layers.0.self_attn.o_proj").weight
    o1 = out.get_submodule("model.layers.0.self_attn.o_proj").weight
    s = (o1 / o0).mean(0).reshape(2, 2, 16)  # [kv, n_rep, head_dim]
    torch.testing.assert_close(s[:, 0], s[:, 1])


def test_awq_never_increases_the_calibration_error_and_targets_limit_it() -> None:
    model = tiny_llama()
    targets = discover(model, include=[r"layers\.0\."])
    res = precondition_model(model, AWQ, _calib(), targets)
    assert res.report.folded and all(e.group != "head" for e in res.report.folded)
    for e in res.report.folded:
        assert e.error_after is not None and e.error_before is not None
        assert e.error_after <= e.error_before
        assert e.layers[0].startswith("model.layers.0.")
    reasons = dict(res.report.not_folded)
    assert "not a quantization target" in reasons["model.layers.1.mlp.down_proj"]
    # Layers kept at 16 bits need no scales: listed, not folded.
    plan = uniform_plan(discover(model), QuantFormat.parse("16"), "tiny")
    kept = precondition_model(model, PreconditionSpec.for_plan(plan, n_grid=4), _calib())
    assert not kept.report.folded
    assert "kept at 16 bits" in dict(kept.report.not_folded)["model.layers.0.mlp.up_proj"]


def test_spec_round_trips_through_a_saved_plan() -> None:
    for spec in (PreconditionSpec(), SF, AWQ, PreconditionSpec("awq", pow2=True)):
        assert PreconditionSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert PreconditionSpec.parse("awq:fmt=3:asym,n_grid=10") == AWQ
    assert PreconditionSpec.parse("scale_folding:alpha=0.5") == SF
    assert PreconditionSpec.parse("none") == PreconditionSpec()
    model = tiny_llama()
    targets = discover(model)
    plan3 = uniform_plan(targets, QuantFormat.parse("3:asym"), "tiny")
    mixed = PreconditionSpec.for_plan(plan3, n_grid=5)
    assert mixed.format_for("model.layers.0.mlp.down_proj") == QuantFormat.parse("3:asym")
    res = precondition_model(model, AWQ, _calib())
    record = res.record.to_dict()
    plan = BitPlan(formats=dict(plan3.formats), model_id="tiny", meta={"precondition": record})
    again = BitPlan.from_json(plan.to_json())
    assert spec_from_plan(again) == AWQ
    assert record_of(again) == res.record  # the typed record round-trips through JSON
    assert again.meta["precondition"]["scales_sha256"] == res.record.scales_sha256
    assert again.meta["precondition"]["version"] == RECORD_VERSION
    # Same spec, same data: the same scales (deterministic).
    assert precondition_model(model, AWQ, _calib()).record.scales_sha256 == res.record.scales_sha256
    assert spec_from_plan(plan3) == PreconditionSpec()
    with pytest.raises(MpqError, match="has version 2; this mpq reads version 1"):
        PreconditionRecord.from_dict({**record, "version": 2})


def test_prepared_keeps_targets_and_an_identical_cost_model() -> None:
    model = tiny_llama()
    targets = discover(model)
    sample = torch.ones(1, 32, dtype=torch.long)
    cost = build_cost_model(model, targets, "tiny", sample)
    prep = Prepared(LoadedModel("tiny", "causal_lm", model), targets, cost)
    new, res = precondition(prep, SF, _calib())
    assert new.loaded.model is res.model and prep.loaded.model is model
    assert new.targets == targets and new.cost == cost
    assert new.loaded.model_id.startswith("tiny+scale_folding-")
    assert build_cost_model(res.model, targets, "tiny", sample) == cost
    plan = uniform_plan(targets, QuantFormat.parse("3:asym"), "tiny")
    assert cost.plan_cost(plan).total_bits == new.cost.plan_cost(plan).total_bits
    # The quantized preconditioned model runs through the executor like any other.
    q = apply_plan(res.model, plan, targets, mode="fake")
    assert torch.isfinite(q(_ids()).logits).all()
    none, _ = precondition(prep, PreconditionSpec(), None)
    assert none.loaded.model_id == "tiny" and none.loaded.model is not model


def test_bad_specs_are_refused() -> None:
    with pytest.raises(MpqError, match="unknown"):
        PreconditionSpec("smoothquant")
    with pytest.raises(MpqError, match=r"\[0, 1\]"):
        PreconditionSpec("scale_folding", alpha=1.5)
    with pytest.raises(MpqError, match="n_grid"):
        PreconditionSpec("awq", n_grid=0)
    with pytest.raises(MpqError, match="no parameters"):
        PreconditionSpec.from_dict({"method": "none", "params": {"alpha": 0.5}})
    with pytest.raises(MpqError, match="groups"):
        PreconditionSpec("awq", groups=("qkv",))


def test_unsupported_architectures_name_the_layer_kinds(convnet: nn.Module) -> None:
    with pytest.raises(MpqError, match=r"Conv2d.*LLaMA-style"):
        precondition_model(convnet, SF, [torch.zeros(1, 3, 8, 8)])
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(MpqError, match=r"\['Linear', 'ReLU'\]"):
        precondition_model(mlp, PreconditionSpec("awq"), [torch.zeros(300, 8)])
    # "none" works on anything.
    assert isinstance(precondition_model(mlp, PreconditionSpec()).model, nn.Sequential)


def test_too_little_calibration_data_is_refused() -> None:
    model = tiny_llama()
    with pytest.raises(MpqError, match=f"at least {MIN_AWQ_TOKENS}"):
        precondition_model(model, AWQ, _calib(n=1, t=64))
    with pytest.raises(MpqError, match="needs calibration data"):
        precondition_model(model, SF, None)
    with pytest.raises(MpqError, match="at least 16"):
        precondition_model(model, SF, _calib(n=1, t=8))


@pytest.mark.slow
def test_folding_keeps_smollm2_logits(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import os

    from mpq.pipeline import prepare, task_for

    if not os.environ.get("MPQ_CACHE"):  # convert into a throwaway cache, never the home one
        monkeypatch.setenv("MPQ_CACHE", str(tmp_path_factory.mktemp("mpq-cache")))
    prep = prepare("smollm2-135m")
    window = task_for(prep, "wiki", "heldout", 1, 32, None)
    ids = window.batches[0]
    calib = task_for(prep, "wiki", "calib", 1, 256, None)
    with torch.no_grad():
        ref = prep.loaded.model(ids).logits
        sf, res = precondition(prep, SF, window)
        torch.testing.assert_close(sf.loaded.model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        # AWQ on the grouped-query o_proj (9 heads, 3 kv heads) only: the cheap group.
        awq = PreconditionSpec("awq", fmt="3:asym", n_grid=5, groups=("attn_out",))
        out = precondition_model(prep.loaded.model, awq, calib, prep.targets)
        torch.testing.assert_close(out.model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert len(res.report.folded) == 4 * 30
    assert len(out.report.folded) == 30
    assert dict(res.report.not_folded).keys() == {"model.embed_tokens", "lm_head"}
    assert sf.cost is prep.cost and sf.targets == prep.targets
