"""The tied embedding / LM head as a quantized target, through every export container.

Oracles: the bytes each container writes equal the cost model's prediction, and quantizing the
embedding changes the whole-model bytes by exactly (fp32 bytes - the container's bytes for
that tensor); the embedding read back from each file equals the executor's dequantized tensor
bit for bit, and the loaded model's logits equal the executor's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.export.command import ExportReport, exporters
from mpq.export.command import export as export_plan
from mpq.export.gguf_writer import GGUF_FILE, _name_map, _row_permutations, gguf_name
from mpq.export.load import load_export
from mpq.formats import QuantFormat
from mpq.models import LoadedModel
from mpq.pipeline import Prepared
from mpq.plan import BitPlan
from mpq.targets import discover

EMB = "model.embed_tokens"
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def _prep(with_embedding: bool = True) -> Prepared:
    model = tiny_llama()
    targets = discover(model, (), () if with_embedding else ("embed", "lm_head"))
    loaded = LoadedModel(model_id="tiny", family="causal_lm", model=model)
    return Prepared(loaded, targets, build_cost_model(model, targets, "tiny"))


def _plan(prep: Prepared, embedding: str | None, decoder: str) -> BitPlan:
    formats = {t.name: QuantFormat.parse(decoder) for t in prep.targets}
    if embedding is not None:
        formats[EMB] = QuantFormat.parse(embedding)
    return BitPlan(formats, "tiny")


def _export(prep: Prepared, plan: BitPlan, fmt: str, out: Path) -> ExportReport:
    return export_plan(prep, plan, exporters()[fmt], out)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# (container, embedding format, decoder format): every container that can hold the embedding.
CASES = [
    ("mpq", "4:g32:mse", "4:g32"),
    ("mpq", "6:g16:dq8", "4:g32:asym"),  # Q6_K's layout on 64-wide rows: mpq stores it
    ("hf", "8:g32", "4:g32:mse"),
    ("gguf", "8:g32", "4:g32"),  # Q8_0, llama.cpp's own choice for SmolLM2's token_embd
    ("gguf", "4:g32", "4:g32"),  # Q4_0
    ("gguf", "5:g32", "4:g32:nl"),  # Q5_0
    ("gguf", "4:g32:nl", "8:g32"),  # IQ4_NL
    ("llamacpp", "6:g32", "4:g32:asym"),  # q6_K -> q8_0 on 64-wide rows
]


@pytest.mark.parametrize(("container", "emb", "dec"), CASES)
def test_bytes_written_equal_the_prediction_with_the_embedding_quantized(
    container: str, emb: str, dec: str, tmp_path: Path
) -> None:
    prep, without = _prep(), _prep(with_embedding=False)
    assert prep.targets[0].name == EMB and prep.targets[0].aliases == ("lm_head",)
    exporter = exporters()[container]
    plan = _plan(prep, emb, dec)
    report = _export(prep, plan, container, tmp_path / "o")
    predicted = exporter.predict(plan, prep.cost)
    assert report.stored.total_bytes == report.predicted_bytes == predicted.total_bytes
    # The embedding's bytes: the container's weight_bytes for its shape, and the whole model
    # shrinks from the fp32 tensor by exactly the difference.
    shape = prep.targets[0].shape
    emb_bytes = exporter.weight_bytes(shape, QuantFormat.parse(emb))
    assert predicted.per_target_bits[EMB] == 8 * emb_bytes
    base = exporter.predict(_plan(without, None, dec), without.cost).total_bytes
    assert base - predicted.total_bytes == 4 * shape[0] * shape[1] - emb_bytes
    # The whole-model bits count every value once (the tied head is not a second tensor).
    assert predicted.model_numel == sum(p.numel() for p in prep.loaded.model.parameters())
    assert report.model_bits == pytest.approx(predicted.model_bits, rel=1e-12)
    assert f"{report.model_bits:.4f} bits per model value" in report.summary()


@pytest.mark.parametrize("container", ["mpq", "hf"])
def test_mpq_folders_give_back_the_executors_embedding_and_logits(
    container: str, tmp_path: Path
) -> None:
    prep = _prep()
    plan = _plan(prep, "5:g32:mse", "4:g32")
    packed = apply_plan(prep.loaded.model, plan, prep.targets)
    _export(prep, plan, container, tmp_path / "o")
    loaded = load_export(tmp_path / "o").model
    got = loaded.get_submodule(EMB).packed
    assert got is loaded.get_submodule("lm_head").packed  # still one tensor
    assert torch.equal(got.dequantize(), packed.get_submodule(EMB).packed.dequantize())
    assert torch.equal(_logits(loaded), _logits(packed))


@pytest.mark.parametrize("emb", ["8:g32", "4:g32", "5:g32", "4:g32:nl"])
def test_gguf_token_embd_is_the_executors_embedding_and_gives_its_logits(
    emb: str, tmp_path: Path
) -> None:
    import gguf

    prep = _prep()
    plan = _plan(prep, emb, "4:g32")
    _export(prep, plan, "gguf", tmp_path / "g")
    fake = apply_plan(prep.loaded.model, plan, prep.targets, mode="fake")
    reader = gguf.GGUFReader(str(tmp_path / "g" / GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # the tied head is token_embd
    want_type = {"8:g32": "Q8_0", "4:g32": "Q4_0", "5:g32": "Q5_0", "4:g32:nl": "IQ4_NL"}[emb]
    assert tensors["token_embd.weight"].tensor_type.name == want_type
    # Rebuild the fp model from every tensor of the file (q/k rows back from llama.cpp's order):
    # the same weights as the executor's fake-quantized model, bit for bit, so the same logits.
    model = tiny_llama()
    names = _name_map(model)
    perms = _row_permutations(model)
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        gt = tensors[gguf_name(names, key)]
        arr = gguf.quants.dequantize(gt.data, gt.tensor_type).reshape(tuple(value.shape))
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
        perm = perms.get(key.rsplit(".", 1)[0])
        if perm is not None:
            w = w[torch.argsort(perm)]
        ref = fake.state_dict()[key]
        assert torch.equal(w, ref), key
        state[key] = w
    model.load_state_dict(state, strict=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(_logits(model), _logits(fake))


def test_containers_that_cannot_hold_the_embedding_say_so(tmp_path: Path) -> None:
    prep = _prep()
    with pytest.raises(MpqError, match=r"model.embed_tokens: a quantized embedding"):
        _export(prep, _plan(prep, "4", "4"), "compressed-tensors", tmp_path / "c")
    # Q6_K (6:g16:dq8) needs rows of whole 256-weight super-blocks; the tiny rows are 64 wide
    # (SmolLM2's 576): the GGUF export names the embedding and the fix.
    with pytest.raises(MpqError, match=r"model.embed_tokens: 6:g16:dq8 is Q6_K"):
        _export(prep, _plan(prep, "6:g16:dq8", "4:g32"), "gguf", tmp_path / "g")
    with pytest.raises(MpqError, match=r"model.embed_tokens: 6:g32 has no GGUF type"):
        _export(prep, _plan(prep, "6:g32", "4:g32"), "gguf", tmp_path / "g")
    assert not any(tmp_path.iterdir())
