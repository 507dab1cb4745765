"""Bundled models and their tasks: targets, tie groups, metrics against oracles.

MiniLM's probe is trained on every ``PROBE_TRAIN_STRIDE``-th BBC train article (the full train
split costs ~40 s on one thread); evaluation uses the real first 40 held-out articles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_folder, tiny_llama, two_log_softmax_stats
from torch import nn

from mpq import data
from mpq.errors import MpqError
from mpq.evaluate import EvalResult, Reference, batch_stats, evaluate, reference, summarize
from mpq.executor import apply_plan, backends
from mpq.formats import QuantFormat
from mpq.mobilenet import STAGES
from mpq.models import LoadedModel, load_model
from mpq.plan import uniform_plan
from mpq.targets import Target, decisions, discover
from mpq.tasks import Task, lm_head, make_task

torch.set_num_threads(1)

PROBE_TRAIN_STRIDE = 4


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield mp


def _eval_plan(loaded: LoadedModel, targets: list[Target], task: Task, ref: Reference, spec: str):
    plan = uniform_plan(targets, QuantFormat.parse(spec), loaded.model_id)
    return evaluate(task, apply_plan(loaded.model, plan, targets, mode="fake"), ref)


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm(module_env: pytest.MonkeyPatch) -> LoadedModel:
    return load_model("minilm-l6")


@pytest.fixture(scope="module")
def minilm_targets(minilm: LoadedModel) -> list[Target]:
    return discover(minilm.model, (), minilm.default_exclude)


@pytest.fixture(scope="module")
def encoder(minilm: LoadedModel) -> tuple[Task, Reference]:
    full = data.labeled_texts

    def fewer(data_id: str, split: str) -> tuple[list[str], list[int]]:
        texts, labels = full(data_id, split)
        if split in ("train", "calib"):
            return texts[::PROBE_TRAIN_STRIDE], labels[::PROBE_TRAIN_STRIDE]
        return texts, labels

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "labeled_texts", fewer)
        task = make_task(minilm, "bbc", "heldout", n=40, seq_len=64)
    return task, reference(task, minilm.model)


def test_minilm_is_an_encoder_with_tokenizer(minilm: LoadedModel) -> None:
    assert minilm.family == "encoder"
    assert minilm.model_id == "minilm-l6"
    assert minilm.tokenizer is not None
    assert minilm.tokenizer("hello world")["input_ids"][0] == minilm.tokenizer.cls_token_id


def test_minilm_targets_and_ties(minilm_targets: list[Target]) -> None:
    suffixes = (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
    expected = [f"encoder.layer.{i}.{s}" for i in range(6) for s in suffixes]
    assert [t.name for t in minilm_targets] == expected
    assert len(minilm_targets) == 36
    assert {t.kind for t in minilm_targets} == {"linear"}
    ties = {t.tie for t in minilm_targets if t.tie is not None}
    assert ties == {f"encoder.layer.{i}.attention.self.qkv" for i in range(6)}
    groups = {k: v for k, v in decisions(minilm_targets).items() if k in ties}
    for key, members in groups.items():
        assert [m.name.rsplit(".", 1)[1] for m in members] == ["query", "key", "value"], key
    assert len(decisions(minilm_targets)) == 36 - 6 * 2


def test_encoder_task_fp_metrics(minilm: LoadedModel, encoder: tuple[Task, Reference]) -> None:
    task, ref = encoder
    assert task.family == "encoder" and task.labels is not None
    assert sum(int(b["input_ids"].shape[0]) for b in task.batches) == 40
    assert max(int(b["input_ids"].shape[1]) for b in task.batches) <= 64
    result = evaluate(task, minilm.model, ref)
    assert result["n_units"] == 40
    assert result["kl"] == pytest.approx(0.0, abs=1e-7)
    assert result["agree"] == 1.0
    # ~0.9 measured (0.875 with the probe trained on the full train split)
    assert result["acc"] >= 0.8
    with torch.no_grad():
        hits = [
            (task.head(minilm.model, b)[:, 0].argmax(-1) == y[:, 0]).float()
            for b, y in zip(task.batches, task.labels, strict=True)
        ]
    assert result["acc"] == pytest.approx(float(torch.cat(hits).sum()) / 40, abs=1e-12)


def test_encoder_two_bits_worse_than_eight(
    minilm: LoadedModel, minilm_targets: list[Target], encoder: tuple[Task, Reference]
) -> None:
    task, ref = encoder
    r8 = _eval_plan(minilm, minilm_targets, task, ref, "8")
    r2 = _eval_plan(minilm, minilm_targets, task, ref, "2")
    assert 0.0 < r8["kl"] < r2["kl"]
    assert r8["agree"] >= r2["agree"]


def test_encoder_zero_docs_is_an_error(minilm: LoadedModel, monkeypatch) -> None:
    import mpq.tasks

    probe = (torch.zeros(5, 384), torch.zeros(5))
    monkeypatch.setattr(mpq.tasks, "train_probe", lambda *a, **k: probe)
    with pytest.raises(MpqError):
        make_task(minilm, "bbc", "heldout", n=0, seq_len=16)


# --------------------------------------------------------------------------- MobileNetV2


@pytest.fixture(scope="module")
def mobilenet(module_env: pytest.MonkeyPatch) -> LoadedModel:
    return load_model("mobilenet-v2")


@pytest.fixture(scope="module")
def mobilenet_targets(mobilenet: LoadedModel) -> list[Target]:
    return discover(mobilenet.model, (), mobilenet.default_exclude)


@pytest.fixture(scope="module")
def cnn(mobilenet: LoadedModel) -> tuple[Task, Reference]:
    task = make_task(mobilenet, "photos", "heldout", n=16)
    return task, reference(task, mobilenet.model)


def test_mobilenet_targets(mobilenet: LoadedModel, mobilenet_targets: list[Target]) -> None:
    assert mobilenet.family == "cnn" and mobilenet.tokenizer is None
    # stem conv + per block (expand 1x1 if t != 1, depthwise 3x3, project 1x1) + head 1x1
    convs = 1 + sum(n * (2 if t == 1 else 3) for t, _, n, _ in STAGES) + 1
    assert convs == 52
    kinds = [t.kind for t in mobilenet_targets]
    assert kinds.count("conv2d") == 52 and kinds.count("linear") == 1
    assert len(mobilenet_targets) == 53
    assert mobilenet_targets[0].name == "features.0.0"
    assert mobilenet_targets[0].shape == (32, 3, 3, 3)
    assert mobilenet_targets[-1].name == "classifier.1"
    assert mobilenet_targets[-1].shape == (1000, 1280)
    modules = dict(mobilenet.model.named_modules())
    assert all(type(modules[t.name]) in (nn.Conv2d, nn.Linear) for t in mobilenet_targets)


def test_cnn_task_kl_grows_as_bits_shrink(
    mobilenet: LoadedModel, mobilenet_targets: list[Target], cnn: tuple[Task, Reference]
) -> None:
    task, ref = cnn
    assert task.family == "cnn" and task.labels is None
    assert sum(int(b.shape[0]) for b in task.batches) == 16
    fp = evaluate(task, mobilenet.model, ref)
    assert fp["kl"] == pytest.approx(0.0, abs=1e-7) and fp["agree"] == 1.0
    r = {b: _eval_plan(mobilenet, mobilenet_targets, task, ref, str(b)) for b in (8, 4, 2)}
    assert 0.0 < r[8]["kl"] < r[4]["kl"] < r[2]["kl"]
    assert r[8]["agree"] >= r[4]["agree"] >= r[2]["agree"]
    assert r[8]["agree"] > r[2]["agree"]
    # 8-bit damage is an order of magnitude below 4-bit's. (Not an absolute agreement: over 16
    # photos one depthwise layer's per-channel rounding bias moves 8-bit agreement by 2/16
    # between the absmax/127 and the full-signed-range rule, KL 0.019 vs 0.14.)
    assert r[8]["kl"] < 0.1 * r[4]["kl"]


def test_packed_matches_fake(mobilenet: LoadedModel, mobilenet_targets: list[Target]) -> None:
    plan = uniform_plan(mobilenet_targets, QuantFormat.parse("4:asym"), mobilenet.model_id)
    x = data.sample_images(4, seed=3)
    packed = apply_plan(mobilenet.model, plan, mobilenet_targets, mode="packed")
    fake = apply_plan(mobilenet.model, plan, mobilenet_targets, mode="fake")
    assert len(backends(packed)) == 53 and not backends(fake)
    with torch.no_grad():
        a, b, fp = fake(x), packed(x), mobilenet.model(x)
    scale = a.abs().max()
    assert float((a - b).abs().max() / scale) <= 1e-4
    assert float((a - fp).abs().max() / scale) > 1e-2  # quantization did change the outputs


def test_cnn_zero_images_is_an_error(mobilenet: LoadedModel) -> None:
    with pytest.raises(MpqError):
        make_task(mobilenet, "photos", "heldout", n=0)


# --------------------------------------------------------------------------- evaluate


def test_batch_stats_matches_torch_oracles() -> None:
    g = torch.Generator().manual_seed(0)
    U, P, C = 3, 5, 7
    logits = torch.randn(U, P, C, generator=g) * 3
    ref_logp = torch.log_softmax(torch.randn(U, P, C, generator=g) * 3, dim=-1)
    labels = torch.randint(0, C, (U, P), generator=g)
    s = batch_stats(logits, ref_logp, labels)
    # Oracles in float64, as batch_stats computes.
    logq = torch.log_softmax(logits.double(), dim=-1)
    ref64 = torch.log_softmax(ref_logp.double(), dim=-1)
    kl = F.kl_div(logq, ref64, log_target=True, reduction="none").sum(-1).mean(-1)
    nll = F.cross_entropy(logits.double().reshape(-1, C), labels.reshape(-1), reduction="none")
    assert s.kl.shape == (U,) and s.positions == P and s.kl.dtype == torch.float64
    torch.testing.assert_close(s.kl, kl, rtol=1e-9, atol=1e-12)
    assert bool((s.kl > 0).all())
    assert s.nll is not None and s.correct is not None
    torch.testing.assert_close(s.nll, nll.reshape(U, P).mean(-1), rtol=1e-9, atol=1e-12)
    agree = (logits.argmax(-1) == ref_logp.argmax(-1)).double().mean(-1)
    assert torch.equal(s.agree, agree)
    assert 0 < float(agree.sum()) < U * P  # the oracle is not trivially all-or-nothing
    assert torch.equal(s.correct, (logits.argmax(-1) == labels).double().mean(-1))
    same = batch_stats(ref_logp, ref_logp, None)
    assert same.nll is None and same.correct is None
    assert torch.equal(same.kl, torch.zeros(U, dtype=torch.float64))  # exactly, not within eps
    assert torch.equal(same.agree, torch.ones(U, dtype=torch.float64))


def test_evaluate_reuses_reference_statistics_and_equals_two_log_softmax() -> None:
    """evaluate() against a Reference equals the two-log_softmax oracle to 1e-9 relative on a
    tiny LM (plans from 8 to 2 bits), and computes each batch's reference statistics once."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    # 3 batches of 2 windows x 40 positions; more positions than one float64 step (ROWS).
    batches = [torch.randint(0, 96, (2, 41), generator=g) for _ in range(3)]
    labels = [b[:, 1:] for b in batches]
    task = Task("causal_lm", "random", "ids", batches, labels, lm_head)
    ref = reference(task, model)
    targets = discover(model, (), ())
    for spec in ("8", "4", "2"):
        plan = uniform_plan(targets, QuantFormat.parse(spec), "tiny")
        quantized = apply_plan(model, plan, targets, mode="fake")
        got = evaluate(task, quantized, ref)
        with torch.no_grad():
            oracle = [
                two_log_softmax_stats(task.head(quantized, b), r, lab)
                for b, r, lab in zip(batches, ref.logits, labels, strict=True)
            ]
        kl = torch.cat([o[0] for o in oracle])
        nll = torch.cat([o[2] for o in oracle if o[2] is not None])
        assert float(kl.min()) > 1e-7  # the plans do damage: the comparison is not 0 == 0
        np.testing.assert_allclose(got.units["kl"], kl.numpy(), rtol=1e-9, atol=0)
        np.testing.assert_allclose(got.units["nll"], nll.numpy(), rtol=1e-9, atol=0)
        assert got.units["agree"] == torch.cat([o[1] for o in oracle]).tolist()
    cached = [ref.batch(i) for i in range(len(batches))]
    assert all(ref.batch(i) is cached[i] for i in range(len(batches)))  # computed once, kept
    fp = evaluate(task, model, ref)
    assert fp["kl"] == 0.0 and fp["agree"] == 1.0  # identical logits: exactly 0


def test_batch_stats_exact_where_the_model_lost_the_position() -> None:
    """Quantized logits far below the reference's (sum p e^d ~ e^-30, where log1p(sum p
    (e^d - 1)) would cancel) still give the oracle's KL to 1e-9 relative."""
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(2, 40, 500, generator=g) * 3
    logits = ref - 30 + torch.randn(2, 40, 500, generator=g) * 4
    logits[0, :5] = ref[0, :5] + 1e-3 * torch.randn(5, 500, generator=g)  # and some it kept
    labels = torch.randint(0, 500, (2, 40), generator=g)
    s = batch_stats(logits, ref, labels)
    kl, agree, nll = two_log_softmax_stats(logits, ref, labels)
    assert s.nll is not None and nll is not None
    torch.testing.assert_close(s.kl, kl, rtol=1e-9, atol=0)
    torch.testing.assert_close(s.nll, nll, rtol=1e-9, atol=0)
    assert torch.equal(s.agree, agree)


def test_batch_stats_falls_back_where_exp_overflows() -> None:
    """Logits 800 above the reference overflow e^(z - r); the KL and NLL then come from lse(z)."""
    ref = torch.zeros(1, 2, 4)
    logits = torch.tensor([[[800.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]]])
    labels = torch.tensor([[1, 2]])
    s = batch_stats(logits, ref, labels)
    kl, agree, nll = two_log_softmax_stats(logits, ref, labels)
    assert nll is not None and s.nll is not None
    torch.testing.assert_close(s.kl, kl, rtol=1e-9, atol=0)
    torch.testing.assert_close(s.nll, nll, rtol=1e-9, atol=0)


def test_batch_stats_resolves_kl_below_float32_noise() -> None:
    """A KL of ~1e-9 (an 8-bit layer's damage on a small model) is resolved and ordered.

    For logits ``z + eps*d``, KL(p_z || p_{z+eps*d}) = eps^2/2 Var_p(d) + O(eps^3): the
    second-order oracle. float32 arithmetic has noise at 1e-7 here; float64 must match.
    """
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 64, 1000, generator=g, dtype=torch.float64) * 3
    d = torch.randn(2, 64, 1000, generator=g, dtype=torch.float64)
    p = torch.softmax(z, -1)
    var = (p * d * d).sum(-1) - (p * d).sum(-1) ** 2
    for eps in (1e-4, 2e-4):
        s = batch_stats(z + eps * d, z, None)
        oracle = (0.5 * eps * eps * var).mean(-1)
        torch.testing.assert_close(s.kl, oracle, rtol=1e-3, atol=0)
    small, large = batch_stats(z + 1e-4 * d, z, None), batch_stats(z + 2e-4 * d, z, None)
    assert bool((large.kl > 3.9 * small.kl).all())


def test_summarize_ppl_and_interval() -> None:
    g = torch.Generator().manual_seed(1)
    stats = []
    for units in (3, 2):
        logits = torch.randn(units, 5, 7, generator=g)
        ref_logp = torch.log_softmax(torch.randn(units, 5, 7, generator=g), dim=-1)
        stats.append(batch_stats(logits, ref_logp, torch.randint(0, 7, (units, 5), generator=g)))
    m: dict[str, float] = summarize(stats).metrics
    nll = torch.cat([s.nll for s in stats if s.nll is not None]).double().numpy()
    kl = torch.cat([s.kl for s in stats]).double().numpy()
    U = 5
    assert m["n_units"] == U and m["n_positions"] == U * 5
    se = float(np.std(nll, ddof=1) / math.sqrt(U))
    assert m["nll"] == pytest.approx(float(nll.mean()), rel=1e-12)
    assert m["nll_se"] == pytest.approx(se, rel=1e-9)
    assert m["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    assert m["ppl_lo"] == pytest.approx(math.exp(nll.mean() - 1.959964 * se), rel=1e-6)
    assert m["ppl_hi"] == pytest.approx(math.exp(nll.mean() + 1.959964 * se), rel=1e-6)
    assert m["ppl_lo"] < m["ppl"] < m["ppl_hi"]
    assert m["kl"] == pytest.approx(float(kl.mean()), rel=1e-12)
    assert m["kl_se"] == pytest.approx(float(np.std(kl, ddof=1) / math.sqrt(U)), rel=1e-9)
    first: EvalResult = summarize(stats[:1])
    assert first["n_units"] == 3
    assert first["kl"] == pytest.approx(float(kl[:3].mean()), rel=1e-12)


def test_summarize_single_unit_has_no_interval() -> None:
    s = batch_stats(torch.zeros(1, 2, 3), torch.log_softmax(torch.zeros(1, 2, 3), -1),
                    torch.zeros(1, 2, dtype=torch.long))  # fmt: skip
    m = summarize([s]).metrics
    assert math.isnan(m["nll_se"])
    assert m["ppl"] == pytest.approx(3.0) and m["ppl_lo"] == m["ppl"] == m["ppl_hi"]


# --------------------------------------------------------------------------- local folders


def test_folder_without_config_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(MpqError, match="has no config.json; give a Hugging Face model folder"):
        load_model(str(tmp_path))


def test_folder_without_weights_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MpqError, match="could not load the model"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("text", ["{oops", "[1]"])
def test_folder_with_malformed_config_is_an_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(MpqError, match="config.json"):
        load_model(str(tmp_path))


def test_local_llama_folder_is_causal_lm(tmp_path: Path) -> None:
    folder = build_tiny_folder(tmp_path / "llama")
    loaded = load_model(str(folder))
    assert loaded.family == "causal_lm"
    assert loaded.model_id == str(folder.resolve())
    assert loaded.default_exclude == ()
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 30522
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    names = [t.name for t in discover(loaded.model, (), loaded.default_exclude)]
    assert names[0] == "model.embed_tokens" and len(names) == 15
    task = make_task(loaded, "wiki", "heldout", n=2, seq_len=16)
    assert [tuple(b.shape) for b in task.batches] == [(1, 16), (1, 16)]
    assert task.labels is not None and torch.equal(task.labels[0], task.batches[0][:, 1:])


def test_local_encoder_folder_without_tokenizer(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    BertModel(cfg).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family == "encoder" and loaded.tokenizer is None
    with pytest.raises(MpqError, match="has no tokenizer; an encoder task needs one"):
        make_task(loaded, "bbc", "heldout", n=2, seq_len=16)
