"""Input statistics against brute force on a tiny model; the disk cache; the executor's use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.layerstats import cached_input_stats, collect_input_stats, merge_stats
from mpq.plan import BitPlan
from mpq.quant.quantize import fake_quantize
from mpq.targets import discover


def _inputs(model: torch.nn.Module, names: list[str], calib: list[torch.Tensor]) -> dict:
    """Every input row of each module, recorded by plain hooks (the oracle)."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, inp, n=n: rows[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        for b in calib:
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in rows.items()}


def _calib(seed: int = 0, n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 12), generator=gen) for _ in range(n)]


def test_statistics_equal_the_brute_force_moments() -> None:
    model = tiny_llama()
    names = [t.name for t in discover(model) if t.kind == "linear"]
    calib = _calib()
    full = [n for n in names if "q_proj" in n or "down_proj" in n]
    stats = collect_input_stats(model, names, calib, full=full)
    xs = _inputs(model, names, calib)
    for n in names:
        x = xs[n]
        assert stats[n].rows == x.shape[0]
        torch.testing.assert_close(stats[n].diag, x.pow(2).mean(0), rtol=1e-10, atol=1e-12)
        if n in full:
            assert stats[n].full is not None
            # Each batch's x^T x is a float32 product (accumulated in float64).
            want = x.T @ x / x.shape[0]
            tol = 1e-5 * float(want.abs().max())
            torch.testing.assert_close(stats[n].full, want, rtol=1e-5, atol=tol)
        else:
            assert stats[n].full is None
    # k_proj shares q_proj's input (one accumulation serves both).
    q = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(stats[q].diag, stats[q.replace("q_", "k_")].diag, rtol=0, atol=0)


def test_merge_is_the_statistics_of_the_union() -> None:
    model = tiny_llama()
    names = ["model.layers.1.mlp.down_proj"]
    a, b = _calib(1, 2), _calib(2, 3)
    merged = merge_stats([collect_input_stats(model, names, c, full=names) for c in (a, b)])[
        names[0]
    ]
    union = collect_input_stats(model, names, a + b, full=names)[names[0]]
    assert merged.rows == union.rows
    torch.testing.assert_close(merged.diag, union.diag, rtol=1e-12, atol=1e-14)
    assert merged.full is not None and union.full is not None
    torch.testing.assert_close(merged.full, union.full, rtol=1e-12, atol=1e-14)


class _Task:
    def __init__(self, batches: list[torch.Tensor], key: str) -> None:
        self.batches, self.key = batches, key


def test_cache_round_trip_and_partial_hits(tmp_path: Path) -> None:
    model = tiny_llama()
    names = [t.name for t in discover(model) if t.kind == "linear"]
    task = _Task(_calib(), "tiny-task")
    first = cached_input_stats(model, names[:3], task, model_id="tiny", cache_root=tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    # A second call with more names and one full matrix: reads the 3, computes the rest.
    again = cached_input_stats(
        model, names, task, model_id="tiny", cache_root=tmp_path, full=[names[0]]
    )
    for n in names[:3]:
        torch.testing.assert_close(again[n].diag, first[n].diag, rtol=0, atol=0)
    assert again[names[0]].full is not None
    fresh = collect_input_stats(model, names, task.batches, full=[names[0]])
    for n in names:
        torch.testing.assert_close(again[n].diag, fresh[n].diag, rtol=1e-12, atol=1e-14)
    # Another task key (other data) is another folder.
    cached_input_stats(model, names[:1], _Task(_calib(5), "other"), model_id="tiny",
                       cache_root=tmp_path)  # fmt: skip
    assert len({p.parent for p in tmp_path.rglob("*.safetensors")}) == 2


def test_executor_weights_mse_by_the_calibration_importance() -> None:
    model = tiny_llama()
    targets = discover(model)
    fmt = QuantFormat.parse("3:g16:mse")
    plan = BitPlan({t.name: fmt for t in targets}, "tiny")
    calib = _calib()
    name = "model.layers.0.mlp.down_proj"
    imp = collect_input_stats(model, [name], calib)[name].diag
    w = model.get_submodule(name).weight.detach()
    weighted = apply_plan(model, plan, targets, mode="fake", calib=calib)
    plain = apply_plan(model, plan, targets, mode="fake")
    got_w = weighted.get_submodule(name).weight.detach()
    got_p = plain.get_submodule(name).weight.detach()
    assert torch.equal(got_w, fake_quantize(w, fmt, importance=imp))
    assert torch.equal(got_p, fake_quantize(w, fmt))

    # The weighted choice has the smaller error where it matters (under the importance).
    def err(q: torch.Tensor) -> float:
        return float(((q - w).double() ** 2 * imp).sum())

    assert err(got_w) < err(got_p)
    # Packed and fake agree.
    packed = apply_plan(model, plan, targets, calib=calib)
    assert torch.equal(packed.get_submodule(name).packed.dequantize(), got_w)


def test_statistics_need_linear_layers_and_batches() -> None:
    model = tiny_llama(tie=False)
    with pytest.raises(MpqError, match="embedding without a tied Linear head"):
        collect_input_stats(model, ["model.embed_tokens"], _calib())
    with pytest.raises(MpqError, match="Linear layers"):
        collect_input_stats(model, ["model.norm"], _calib())
    with pytest.raises(MpqError, match="no batches"):
        collect_input_stats(model, ["model.layers.0.mlp.down_proj"], [])


def test_tied_embedding_takes_the_heads_input_statistics() -> None:
    """The tied embedding/head target is weighted by the head's input (the final hidden state):
    its statistics are the brute-force moments of lm_head's inputs, and the executor's mse uses
    them for the shared tensor (both the lookup and the head read the result)."""
    model = tiny_llama()
    calib = _calib()
    name = "model.embed_tokens"
    st = collect_input_stats(model, [name], calib, full=[name])[name]
    x = _inputs(model, ["lm_head"], calib)["lm_head"]
    assert st.rows == x.shape[0]
    torch.testing.assert_close(st.diag, x.pow(2).mean(0), rtol=1e-10, atol=1e-12)
    targets = discover(model)
    assert targets[0].name == name and targets[0].aliases == ("lm_head",)
    fmt = QuantFormat.parse("3:g16:mse")
    plan = BitPlan({t.name: fmt for t in targets}, "tiny")
    w = model.get_submodule(name).weight.detach()
    weighted = apply_plan(model, plan, targets, mode="fake", calib=calib)
    want = fake_quantize(w, fmt, importance=st.diag)
    assert not torch.equal(want, fake_quantize(w, fmt))  # the importance changes the codes
    assert torch.equal(weighted.get_submodule(name).weight.detach(), want)
    assert weighted.get_submodule("lm_head").weight is weighted.get_submodule(name).weight
    packed = apply_plan(model, plan, targets, calib=calib)
    assert torch.equal(packed.get_submodule(name).packed.dequantize(), want)
    assert packed.get_submodule("lm_head").packed is packed.get_submodule(name).packed
