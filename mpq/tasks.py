"""Tasks: what a model family is evaluated on, as batches plus a head that yields logits.

- ``causal_lm``: fixed token windows; logits of every next token (``[windows, T-1, vocab]``),
  labels are the next tokens, so perplexity is measured directly.
- ``encoder``: BBC articles; mean-pooled sentence embeddings go through a logistic-regression
  probe trained once on the fp32 model's embeddings of the train split (``[docs, 1, 5]``).
- ``cnn``: deterministic crops of bundled photos (no labelled ImageNet offline): logits over the
  1000 classes, compared with the fp32 model's own (``[images, 1, 1000]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpq import data
from mpq.errors import MpqError
from mpq.models import LoadedModel

Head = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class Task:
    """Batches of model inputs, optional labels per batch, and the head that makes logits."""

    family: str
    data_id: str
    split: str
    batches: list[Any]
    labels: list[torch.Tensor] | None
    head: Head

    @property
    def key(self) -> str:
        """Identifies the data for caches: family, data, split and the shape of the batches."""
        n = sum(_units(b) for b in self.batches)
        return f"{self.family}-{self.data_id}-{self.split}-{n}x{_width(self.batches[0])}"


def _units(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(batch["input_ids"].shape[0])
    return int(batch.shape[0])


def _width(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(batch["input_ids"].shape[1])
    return int(batch.shape[-1])


def lm_head(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[:, :-1]


def lm_task(
    tokenizer: Any,
    data_id: str,
    split: str,
    seq_len: int,
    n_windows: int | None,
    batch_size: int = 1,
) -> Task:
    windows = data.text_windows(data_id, split, tokenizer, seq_len, n_windows)
    batches = list(windows.split(batch_size))
    return Task("causal_lm", data_id, split, batches, [b[:, 1:] for b in batches], lm_head)


def mean_pool(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _tokenize(tokenizer: Any, texts: Sequence[str], seq_len: int, batch_size: int) -> list[Any]:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            truncation=True,
            max_length=seq_len,
            padding=True,
            return_tensors="pt",
        )
        out.append(dict(enc))
    return out


def train_probe(
    model: nn.Module, tokenizer: Any, seq_len: int, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A logistic-regression probe (weight ``[5, d]``, bias ``[5]``) on fp32 BBC embeddings."""
    from sklearn.linear_model import LogisticRegression

    texts, labels = data.labeled_texts("bbc", "train")
    with torch.no_grad():
        emb = torch.cat(
            [mean_pool(model, b) for b in _tokenize(tokenizer, texts, seq_len, batch_size)]
        )
    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(emb.numpy(), labels)
    w = torch.tensor(clf.coef_, dtype=torch.float32)
    b = torch.tensor(clf.intercept_, dtype=torch.float32)
    return w, b


def encoder_task(
    loaded: LoadedModel, split: str, n_docs: int | None, seq_len: int, batch_size: int = 32
) -> Task:
    """BBC documents of ``split`` (calib = the probe's train split, heldout = test)."""
    if loaded.tokenizer is None:
        raise MpqError(f"{loaded.model_id} has no tokenizer; an encoder task needs one")
    w, b = train_probe(loaded.model, loaded.tokenizer, seq_len, batch_size)
    texts, labels = data.labeled_texts("bbc", split)
    texts, labels = texts[:n_docs], labels[:n_docs]
    batches = _tokenize(loaded.tokenizer, texts, seq_len, batch_size)
    lab = torch.tensor(labels, dtype=torch.long)
    label_batches = [x[:, None] for x in lab.split(batch_size)]

    def head(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (mean_pool(model, batch) @ w.T + b)[:, None, :]

    return Task("encoder", "bbc", split, batches, label_batches, head)


def cnn_head(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)[:, None, :]


def cnn_task(n_images: int, seed: int, batch_size: int = 16) -> Task:
    images = data.sample_images(n_images, seed=seed)
    return Task("cnn", "photos", f"seed{seed}", list(images.split(batch_size)), None, cnn_head)


def make_task(
    loaded: LoadedModel,
    data_id: str,
    split: str,
    n: int | None,
    seq_len: int | None = None,
    batch_size: int | None = None,
) -> Task:
    """The task for ``loaded``'s family on ``data_id``: ``n`` windows, documents or images."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise MpqError(f"n={n!r}: give a positive number of windows / documents / images")
    seq = loaded.seq_len if seq_len is None else seq_len
    if seq < 2:
        raise MpqError(f"seq_len={seq}: a window needs at least 2 tokens")
    if loaded.family == "causal_lm":
        if loaded.tokenizer is None:
            raise MpqError(f"{loaded.model_id} has no tokenizer; text evaluation needs one")
        return lm_task(loaded.tokenizer, data_id, split, seq, n, batch_size or 1)
    if loaded.family == "encoder":
        if data_id != "bbc":
            raise MpqError(f"encoder models are evaluated on 'bbc' classification, not {data_id!r}")
        return encoder_task(loaded, split, n, seq, batch_size or 32)
    if loaded.family == "cnn":
        if data_id != "photos":
            raise MpqError(f"CNN models are evaluated on 'photos', not {data_id!r}")
        return cnn_task(
            64 if n is None else n, seed=0 if split == "heldout" else 1, batch_size=batch_size or 16
        )
    raise MpqError(f"unknown model family {loaded.family!r}")
