"""``AutoModelForCausalLM.from_pretrained`` on an ``mpq export --format hf`` folder (with
``import mpq.hf``) computes exactly what ``mpq.load`` computes: the oracle is mpq.load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.export.command import export as export_plan
from mpq.export.command import exporters
from mpq.formats import QuantFormat
from mpq.models import LoadedModel
from mpq.pipeline import Prepared
from mpq.plan import BitPlan
from mpq.targets import decisions, discover

torch.set_num_threads(1)
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def _export(out: Path) -> None:
    model = tiny_llama()
    targets = discover(model)
    prep = Prepared(
        LoadedModel(model_id="tiny", family="causal_lm", model=model),
        targets,
        build_cost_model(model, targets, "tiny"),
    )
    specs = ["4:g32:asym", "3", "8", "16", "5:asym"]
    formats = {}
    for i, members in enumerate(decisions(targets).values()):
        for t in members:
            formats[t.name] = QuantFormat.parse(specs[i % len(specs)])
    export_plan(prep, BitPlan(formats, "tiny"), exporters()["hf"], out)


def test_from_pretrained_equals_mpq_load(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import mpq.hf  # noqa: F401  # registers quant_method "mpq" with transformers

    out = tmp_path / "hf"
    _export(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = model(IDS).logits
        want = mpq.load(out)(IDS).logits
    assert torch.equal(got, want)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"


def test_from_pretrained_checks_the_manifest(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import mpq.hf  # noqa: F401

    out = tmp_path / "hf"
    _export(out)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x10  # one flipped bit in a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(MpqError, match="does not match its sha256"):
        AutoModelForCausalLM.from_pretrained(out)
