"""Export formats on a tiny LLaMA: every round trip against mpq's own packed model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cycled_plan, tiny_llama

import mpq
from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.export.command import ExportReport, exporters
from mpq.export.command import export as export_plan
from mpq.export.common import MANIFEST, ExportInput
from mpq.export.gguf_writer import GGUF_FILE, _name_map, _row_permutations, gguf_name
from mpq.export.llamacpp import SCRIPT, SOURCE, TYPES_FILE, llama_type
from mpq.export.load import load_export
from mpq.export.mpq_format import WEIGHTS
from mpq.export.safetensors import tensor_bytes_in_file
from mpq.formats import QuantFormat
from mpq.models import LoadedModel
from mpq.pipeline import Prepared
from mpq.plan import BitPlan, uniform_plan
from mpq.targets import discover

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _prep(exclude: tuple[str, ...] = ()) -> Prepared:
    model = tiny_llama()
    targets = discover(model, (), exclude)
    loaded = LoadedModel(model_id="tiny", family="causal_lm", model=model)
    return Prepared(loaded, targets, build_cost_model(model, targets, "tiny"))


def _export(prep: Prepared, plan: BitPlan, fmt: str, out: Path, **kw: object) -> ExportReport:
    return export_plan(prep, plan, exporters()[fmt], out, **kw)  # type: ignore[arg-type]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


MIXED = ["4:g32:asym", "3", "5:asym", "8", "6:g64", "2:g32", "16", "7:bf16", "4:fp32"]


@pytest.mark.parametrize("fmt", ["mpq", "hf"])
def test_mpq_and_hf_folders_reload_bit_identical(fmt: str, tmp_path: Path) -> None:
    prep = _prep()
    plan = cycled_plan(prep, MIXED)
    before = _logits(apply_plan(prep.loaded.model, plan, prep.targets, mode="packed"))
    report = _export(prep, plan, fmt, tmp_path / "out")
    folder = tmp_path / "out"
    # Tensor bytes on disk equal the plan's total bytes, to the byte.
    assert tensor_bytes_in_file(folder / WEIGHTS) == prep.cost.plan_cost(plan).total_bytes
    assert report.stored.total_bytes == report.predicted_bytes
    loaded = load_export(folder)
    assert loaded.format == fmt
    assert dict(loaded.plan.formats) == dict(plan.formats)
    assert torch.equal(_logits(loaded.model), before)
    assert torch.equal(_logits(mpq.load(folder)), before)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", WEIGHTS, MANIFEST} <= names
    assert ("plan.json" in names) == (fmt == "mpq")
    if fmt == "hf":
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "mpq" and qc["version"] == 1
        assert (
            qc["formats"]["model.layers.0.self_attn.o_proj"]
            == plan["model.layers.0.self_attn.o_proj"].spec()
        )
    # No pickle anywhere: every file is JSON, text or safetensors.
    for p in folder.iterdir():
        assert p.suffix in (".json", ".safetensors", ".txt", ""), p


def test_changed_file_is_refused_by_checksum(tmp_path: Path) -> None:
    prep = _prep()
    _export(prep, uniform_plan(prep.targets, QuantFormat(4), "tiny"), "mpq", tmp_path / "o")
    cfg = tmp_path / "o" / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    with pytest.raises(MpqError, match=r"config.json does not match its sha256"):
        mpq.load(tmp_path / "o")
    (tmp_path / "o" / WEIGHTS).unlink()
    with pytest.raises(MpqError, match=r"model.safetensors is missing"):
        mpq.load(tmp_path / "o")
    with pytest.raises(MpqError, match="does not exist"):
        mpq.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MpqError, match="has no mpq_manifest.json"):
        mpq.load(tmp_path / "empty")
    with pytest.raises(MpqError, match="not an mpq export"):
        mpq.load(tmp_path / "empty", verify=False)


def test_out_folder_is_never_half_written(tmp_path: Path) -> None:
    prep = _prep()
    plan = uniform_plan(prep.targets, QuantFormat(4), "tiny")
    (tmp_path / "o").mkdir()
    with pytest.raises(MpqError, match="already exists; pass --force"):
        _export(prep, plan, "mpq", tmp_path / "o")
    with pytest.raises(MpqError, match="cannot express this plan"):
        _export(prep, plan, "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp folders left behind
    _export(prep, plan, "mpq", tmp_path / "o", force=True)
    assert (tmp_path / "o" / MANIFEST).is_file()


def _fp16_half_ulp(x: np.ndarray) -> np.ndarray:
    return np.spacing(np.abs(x).astype(np.float16)).astype(np.float32) / 2


def test_gguf_dequantizes_to_mpq_weights(tmp_path: Path) -> None:
    import gguf

    prep = _prep()
    plan = cycled_plan(prep, ["4:g32:asym", "4:g32", "5:g32:asym", "5:g32", "8:g32", "16"])
    report = _export(prep, plan, "gguf", tmp_path / "g")
    packed = apply_plan(prep.loaded.model, plan, prep.targets)
    reader = gguf.GGUFReader(str(tmp_path / "g" / GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    names = _name_map(prep.loaded.model)
    perms = _row_permutations(prep.loaded.model)
    expected_type = {"4:g32:asym": "Q4_1", "4:g32": "Q4_0", "5:g32:asym": "Q5_1",
                     "5:g32": "Q5_0", "8:g32": "Q8_0", "16": "F16"}  # fmt: skip
    seen_types = set()
    for t in prep.targets:
        fmt = plan[t.name]
        gt = tensors[gguf_name(names, f"{t.name}.weight")]
        assert gt.tensor_type.name == expected_type[fmt.spec()]
        seen_types.add(gt.tensor_type.name)
        got = gguf.quants.dequantize(gt.data, gt.tensor_type).reshape(t.shape)
        pw = packed.get_submodule(t.name).packed
        ref = pw.dequantize().numpy()
        perm = perms.get(t.name)
        if perm is not None:  # llama.cpp's rotary row order for q and k
            ref = ref[perm.numpy()]
        if fmt.symmetric or fmt.keep:
            assert np.array_equal(got, ref), t.name  # same codes and scales: bit-exact
        else:
            # Q4_1/Q5_1 store m = -z*d in fp16: off by at most half an fp16 ulp of z*d.
            zd = (pw.zeros().float() * pw.scales.float()).numpy()
            if perm is not None:
                zd = zd[perm.numpy()]
            bound = np.repeat(_fp16_half_ulp(zd), 32, axis=1) + np.abs(ref) * 2**-23
            assert (np.abs(got - ref) <= bound + 1e-12).all(), t.name
            assert not np.array_equal(got, ref)  # the tolerance is needed, and used
    assert seen_types == set(expected_type.values())
    # Tied LM head: written once, as token_embd; norms at F32.
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    # Metadata as llama.cpp's converter writes it.
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 2
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert BitPlan.from_json(bytes(fields["mpq.plan"].parts[-1]).decode()).formats == plan.formats
    # Symmetric types store exactly mpq's bytes; asymmetric ones an fp16 min per block.
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    assert sum(sizes.values()) == report.stored.total_bytes == report.predicted_bytes
    assert report.stored.total_bytes > report.mpq_bytes
    sym = cycled_plan(prep, ["4:g32", "5:g32", "8:g32"])
    sym_report = _export(prep, sym, "gguf", tmp_path / "s")
    assert sym_report.stored.total_bytes == sym_report.predicted_bytes == sym_report.mpq_bytes


def test_gguf_refuses_formats_without_a_type_and_lists_what_maps(tmp_path: Path) -> None:
    prep = _prep()
    plan = cycled_plan(prep, ["4", "4:g32", "8:g32:asym", "4:g32:bf16", "3:g32"])
    with pytest.raises(MpqError) as err:
        _export(prep, plan, "gguf", tmp_path / "g")
    msg = str(err.value)
    assert "4 has no GGUF type" in msg and "8:g32:asym has no GGUF type" in msg
    assert "4:g32:bf16 has no GGUF type" in msg and "3:g32 has no GGUF type" in msg
    assert "4:g32 -> Q4_0" in msg and "4:g32:asym -> Q4_1" in msg and "8:g32 -> Q8_0" in msg


def test_llamacpp_overrides_name_every_tensor_of_the_source(tmp_path: Path) -> None:
    import gguf

    prep = _prep(exclude=("embed",))
    plan = cycled_plan(prep, ["3", "4:asym", "5", "6", "8", "16", "2"])
    report = _export(prep, plan, "llamacpp", tmp_path / "l")
    folder = tmp_path / "l"
    lines = (folder / TYPES_FILE).read_text().splitlines()
    types = dict(line.split("=", 1) for line in lines)
    source = {t.name: t for t in gguf.GGUFReader(str(folder / SOURCE)).tensors}
    import re

    for pattern in types:
        assert sum(bool(re.fullmatch(pattern, n)) for n in source) == 1, pattern
    assert types[r"blk\.0\.attn_q\.weight"] == "iq4_nl"  # 3 bits, rows of 64: no k-quant
    assert types[r"blk\.0\.attn_output\.weight"] == "q5_0"  # 4 bits -> q4_K -> fallback
    assert types[r"blk\.1\.attn_output\.weight"] == "f16"
    assert types[r"token_embd\.weight"] == "f32"  # excluded: kept as the plan counts it
    assert source["blk.0.attn_q.weight"].tensor_type.name == "F16"
    script = (folder / SCRIPT).read_text()
    assert "llama-quantize --pure" in script and f"{SOURCE} model-mpq.gguf" in script
    assert script.count("--tensor-type") == len(lines)
    assert report.stored.total_bytes == report.predicted_bytes
    assert report.predicted_bytes == exporters()["llamacpp"].predict(plan, prep.cost).total_bytes
    # k-quants where rows hold whole 256-value super-blocks (SmolLM2's down_proj: 1536).
    assert [llama_type(b, 1536) for b in (2, 3, 4, 5, 6, 8, 16)] == [
        "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0", "f16"
    ]  # fmt: skip
    assert [llama_type(b, 576) for b in (2, 3, 4, 5, 6)] == [
        "iq4_nl", "iq4_nl", "q5_0", "q5_1", "q8_0"
    ]  # fmt: skip


def test_compressed_tensors_decompress_to_mpq_weights(tmp_path: Path) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    prep = _prep(exclude=("embed",))
    plan = cycled_plan(prep, ["4", "4:g32:asym", "8", "8:asym:bf16", "16", "4:g32:fp32"])
    report = _export(prep, plan, "compressed-tensors", tmp_path / "c")
    folder = tmp_path / "c"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert len(qc["config_groups"]) == 5  # one per quantized format, layers named exactly
    cfg = QuantizationConfig.model_validate(qc)
    model = tiny_llama()
    apply_quantization_config(model, cfg)
    state = load_file(str(folder / "model.safetensors"))
    packed = apply_plan(prep.loaded.model, plan, prep.targets)
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    for t in prep.targets:
        fmt = plan[t.name]
        ref = packed.get_submodule(t.name).packed.dequantize()
        scheme = getattr(model.get_submodule(t.name), "quantization_scheme", None)
        if fmt.keep:
            assert scheme is None and t.name in qc["ignore"]
            assert torch.equal(state[f"{t.name}.weight"], ref.half())
            continue
        assert scheme is not None and scheme.weights.num_bits == fmt.bits
        assert scheme.weights.group_size == fmt.group_size
        local = {k[len(t.name) + 1 :]: v for k, v in state.items() if k.startswith(t.name + ".")}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or cfg.format)
        weight = compressor.decompress(local, scheme)["weight"]
        # (q - zp) * scale in the scale dtype: mpq's exact product, rounded to that dtype.
        assert torch.equal(weight, ref.to(dtypes[fmt.scale_dtype])), t.name
    # Container overhead: the 16-byte weight_shape of each quantized layer (the zero-points
    # pack to mpq's size here: rows * bits is a multiple of 32).
    quantized = sum(not plan[t.name].keep for t in prep.targets)
    assert report.stored.total_bytes == report.predicted_bytes
    assert report.stored.total_bytes - report.mpq_bytes == 16 * quantized


def test_compressed_tensors_refuses_3_bits_and_quantized_embeddings(tmp_path: Path) -> None:
    prep = _prep()
    plan = cycled_plan(prep, ["4", "3"])  # the embedding at 4 bits, q/k/v at 3
    with pytest.raises(MpqError) as err:
        _export(prep, plan, "compressed-tensors", tmp_path / "c")
    msg = str(err.value)
    assert "3 is not a compressed-tensors int format" in msg
    assert "model.embed_tokens: a quantized embedding" in msg
    assert "what maps: 4 or 8 bits" in msg


def test_export_input_tokens_of_a_bpe_tokenizer_go_into_the_gguf(tmp_path: Path) -> None:
    """A BPE tokenizer (like SmolLM2's) is written as llama.cpp's gpt2 tokenizer."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mpq.export.gguf_writer import write_gguf

    vocab = {"t": 0, "1": 1, "t1": 2} | {f"w{i}": i for i in range(3, 94)}
    vocab |= {"<s>": 94, "</s>": 95}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "1")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    prep = _prep()
    plan = uniform_plan(prep.targets, QuantFormat.parse("8:g32"), "tiny")
    packed = apply_plan(prep.loaded.model, plan, prep.targets)
    inp = ExportInput(prep.loaded.model, packed, plan, prep.targets, "tiny", prep.cost, fast)
    assert write_gguf(inp, tmp_path / "t.gguf") == []
    fields = gguf.GGUFReader(str(tmp_path / "t.gguf")).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 96
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 95
    assert len(fields["tokenizer.ggml.merges"].data) == 1
