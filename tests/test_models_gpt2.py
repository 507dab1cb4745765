"""A GPT-2 folder: a causal LM whose Conv1D projections are linear targets (weight transposed),
counted on an input no longer than the model's own maximum positions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_folder

from mpq.models import load_model, sample_input
from mpq.targets import discover

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    tiny = build_tiny_folder(root / "tiny")  # for its tokenizer files
    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, vocab_size=30522)
    folder = root / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, folder / f.name)
    return folder


def test_gpt2_is_a_causal_lm_with_linear_projection_targets(gpt2_folder: Path) -> None:
    from transformers import GPT2LMHeadModel

    loaded = load_model(str(gpt2_folder))
    assert loaded.family == "causal_lm"
    assert loaded.max_positions == 64 and loaded.seq_len == 64
    assert sample_input(loaded).shape == (1, 64)
    targets = {t.name: t for t in discover(loaded.model)}
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        assert targets[name].kind == "linear"
    assert targets["transformer.h.0.attn.c_attn"].shape == (96, 32)  # [out, in]
    # oracle: the untouched transformers model computes the same logits
    ref = GPT2LMHeadModel.from_pretrained(gpt2_folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 30522, (2, 20))
    with torch.no_grad():
        got, want = loaded.model(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gpt2_inspect_and_eval_run(gpt2_folder: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from mpq.cli import main

    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPQ_THREADS", "1")
    assert main(["inspect", "--model", str(gpt2_folder)]) == 0
    assert "transformer.h.0.attn.c_attn" in capsys.readouterr().out
    argv = ["eval", "--model", str(gpt2_folder), "--plan", "uniform:4", "--n", "1",
            "--seq-len", "16"]  # fmt: skip
    assert main(argv) == 0


def test_gpt2_export_reloads_with_the_same_logits(gpt2_folder: Path, tmp_path: Path, monkeypatch):
    import mpq
    from mpq.cli import main
    from mpq.executor import apply_plan
    from mpq.formats import QuantFormat
    from mpq.plan import uniform_plan

    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPQ_THREADS", "1")
    out = tmp_path / "gpt2-mpq"
    argv = ["export", "--model", str(gpt2_folder), "--format", "mpq", "--plan", "uniform:4",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    loaded = load_model(str(gpt2_folder))
    targets = discover(loaded.model)
    plan = uniform_plan(targets, QuantFormat(4), loaded.model_id)
    want = apply_plan(loaded.model, plan, targets, mode="packed")
    ids = torch.randint(0, 30522, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mpq.load(out)(ids).logits, want(ids).logits)
