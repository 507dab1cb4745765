"""Sequential GPTQ oracles: the statistics of each layer are those of the partly quantized model
computed by a plain forward pass, one block equals the full-precision path, and GPTQ's fitted
objective stays below round-to-nearest's on every layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_llama

from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.layerstats import InputStats, collect_input_stats
from mpq.plan import BitPlan
from mpq.quant.gptq import GPTQConfig, gptq_quantize
from mpq.quant.quantize import dequantize, fake_quantize
from mpq.sequential import Need, find_blocks, run_sequential
from mpq.targets import discover

# Block-path and full-forward sums run the same float32 ops on the same values; the float64
# accumulation only reorders, so entries agree to float32 rounding of the largest entry.
STATS_RTOL = 1e-5

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ORDER = (*QKV, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _calib(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 12), generator=gen) for _ in range(n)]


def _rtn(model: torch.nn.Module, name: str) -> None:
    w = model.get_submodule(name).weight
    with torch.no_grad():
        w.copy_(fake_quantize(w, QuantFormat.parse("3:g32")))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = STATS_RTOL * float(b.abs().max())
    assert float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_each_layer_sees_the_inputs_of_the_partly_quantized_model(granularity: str) -> None:
    """Oracle: a plain forward pass of a copy with every earlier layer (``layer``) or every
    earlier block (``block``) quantized gives the same second moments, diagonal and full."""
    model = tiny_llama(seed=1)
    oracle = tiny_llama(seed=1)
    calib = _calib()
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ORDER]
    needs = {n: Need(diag=True, full=True) for n in names}
    got: dict[str, InputStats] = {}

    def quantize(name: str, st: InputStats | None) -> None:
        assert st is not None
        got[name] = st
        _rtn(model, name)

    assert run_sequential(model, calib, names, needs, quantize, granularity=granularity) is None
    assert list(got) == names  # the model's order, stage by stage
    done: list[str] = []
    for i in range(2):
        stages = (
            [list(QKV), ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
            if granularity == "layer"
            else [list(ORDER)]
        )
        for stage in stages:
            full = [f"model.layers.{i}.{m}" for m in stage]
            want = collect_input_stats(oracle, full, calib, full=full)
            for n in full:
                st, ref = got[n], want[n]
                assert st.rows == ref.rows == 3 * 2 * 12
                assert st.full is not None and ref.full is not None
                _close(st.full, ref.full)
                _close(st.diag, ref.diag)
            for n in full:
                _rtn(oracle, n)
            done += full
    # The second block's statistics really differ from the full-precision model's.
    fp = collect_input_stats(tiny_llama(seed=1), [names[7]], calib, full=[names[7]])[names[7]]
    assert fp.full is not None and got[names[7]].full is not None
    assert float((fp.full - got[names[7]].full).abs().max()) > 1e-3 * float(fp.full.abs().max())


def _one_block() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def test_one_block_by_block_equals_the_full_precision_path() -> None:
    """With one block, ``block`` granularity takes every Hessian from the fp model's block input:
    the same codes as the one-pass path (same float ops on the same values)."""
    model = _one_block()
    targets = [t for t in discover(model) if t.name.startswith("model.layers.")]
    plan = BitPlan({t.name: QuantFormat.parse("4:g32:gptq") for t in targets}, "tiny")
    calib = _calib()
    seq = apply_plan(model, plan, targets, mode="fake", calib=calib,
                     gptq=GPTQConfig(sequential="block"))  # fmt: skip
    off = apply_plan(model, plan, targets, mode="fake", calib=calib,
                     gptq=GPTQConfig(sequential="off"))  # fmt: skip
    for t in targets:
        a, b = seq.get_submodule(t.name).weight, off.get_submodule(t.name).weight
        assert torch.equal(a, b), t.name
    # ``layer`` granularity differs on the layers after q/k/v (their inputs are quantized).
    lay = apply_plan(model, plan, targets, mode="fake", calib=calib)
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(lay.get_submodule(q).weight, off.get_submodule(q).weight)
    o = "model.layers.0.mlp.down_proj"
    assert not torch.equal(lay.get_submodule(o).weight, off.get_submodule(o).weight)


@pytest.mark.parametrize("spec", ["4:g32", "3:g16:asym"])
def test_gptq_objective_on_its_calibration_inputs_is_below_rtn(spec: str) -> None:
    """Every layer of a random 2-block model, under the Hessian sequential GPTQ fitted it to."""
    model = tiny_llama(seed=2)
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ORDER]
    fmt = QuantFormat.parse(spec)
    gfmt = dataclasses.replace(fmt, method="gptq")
    ratios = []

    def quantize(name: str, st: InputStats | None) -> None:
        assert st is not None and st.full is not None
        w = model.get_submodule(name).weight
        wg = dequantize(gptq_quantize(w, st.full, gfmt, grid="rtn").quantized)
        wr = fake_quantize(w, fmt)
        dg, dr = (w - wg).double(), (w - wr).double()
        g = float(torch.einsum("ij,jk,ik->", dg, st.full, dg))
        r = float(torch.einsum("ij,jk,ik->", dr, st.full, dr))
        ratios.append(g / r)
        with torch.no_grad():
            w.copy_(wg)

    needs = {n: Need(diag=True, full=True) for n in names}
    assert run_sequential(model, _calib(4, 1), names, needs, quantize) is None
    assert len(ratios) == len(names) and max(ratios) < 1.0


def test_bad_requests() -> None:
    model = tiny_llama()
    targets = discover(model)
    plan = BitPlan(
        {t.name: QuantFormat.parse("4:g32:gptq" if t.kind == "linear" else "4:g32")
         for t in targets}, "tiny",
    )  # fmt: skip
    calib = _calib()
    stats = collect_input_stats(model, [t.name for t in targets if t.kind == "linear"], calib,
                                full=[t.name for t in targets if t.kind == "linear"])  # fmt: skip
    with pytest.raises(MpqError, match="both stats= and calib="):
        apply_plan(model, plan, targets, calib=calib, stats=stats)
    with pytest.raises(MpqError, match="sequential='x' is unknown"):
        GPTQConfig(sequential="x")
    assert isinstance(find_blocks(torch.nn.Linear(2, 2), ["weight"]), str)
