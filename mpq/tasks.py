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


PRIMARY = {"causal_lm": "ppl", "encoder": "acc", "cnn": "kl"}


@dataclass
class Task:
    """Batches of model inputs, optional labels per batch, and the head that makes logits."""

    family: str
    data_id: str
    split: str
    batches: list[Any]
    labels: list[torch.Tensor] | None
    head: Head
    offset: int = 0

    @property
    def primary(self) -> str:
        """The metric a report ranks plans by: perplexity for language models, the probe's
        topic accuracy for the encoder, KL to the fp model for the CNN (no labels)."""
        return PRIMARY.get(self.family, "kl")

    @property
    def key(self) -> str:
        """Identifies the data for caches: family, data, split, offset and the batch shapes."""
        n = sum(_units(b) for b in self.batches)
        at = f"@{self.offset}" if self.offset else ""
        return f"{self.family}-{self.data_id}-{self.split}{at}-{n}x{_width(self.batches[0])}"


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
    offset: int = 0,
) -> Task:
    """Windows ``[offset*n, (offset+1)*n)`` of the split: each offset is a disjoint sample.

    MpqError when the split has fewer windows than that (never a silently smaller sample)."""
    want = None if n_windows is None else n_windows * (offset + 1)
    windows = data.text_windows(data_id, split, tokenizer, seq_len, want)
    if n_windows is not None and want is not None and windows.shape[0] < want:
        have = int(windows.shape[0])
        if offset:
            raise MpqError(
                f"{data_id} {split} has {have} {seq_len}-token windows, too few for sample "
                f"{offset} of {n_windows} windows (needs {want}); use fewer seeds, windows or "
                f"tokens"
            )
        raise MpqError(
            f"{data_id} {split} has only {have} windows of {seq_len} tokens, fewer than the "
            f"{n_windows} asked for; ask for at most n={have} (--n), or a shorter seq_len"
        )
    if n_windows is not None and offset:
        windows = windows[offset * n_windows :]
    batches = list(windows.split(batch_size))
    labels = [b[:, 1:] for b in batches]
    return Task("causal_lm", data_id, split, batches, labels, lm_head, offset)


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
    loaded: LoadedModel,
    split: str,
    n_docs: int | None,
    seq_len: int,
    batch_size: int = 32,
    offset: int = 0,
) -> Task:
    """BBC documents of ``split`` (calib = the probe's train split, heldout = test)."""
    if loaded.tokenizer is None:
        raise MpqError(f"{loaded.model_id} has no tokenizer; an encoder task needs one")
    w, b = train_probe(loaded.model, loaded.tokenizer, seq_len, batch_size)
    texts, labels = data.labeled_texts("bbc", split)
    if n_docs is not None:
        start = offset * n_docs
        if len(texts) < start + n_docs:
            samples = f"{offset + 1} samples of {n_docs}" if offset else f"{n_docs}"
            raise MpqError(
                f"bbc {split} has only {len(texts)} documents, fewer than the {samples} asked "
                f"for; ask for at most n={len(texts) // (offset + 1)} (--n)"
                + (" or use fewer seeds" if offset else "")
            )
        texts, labels = texts[start : start + n_docs], labels[start : start + n_docs]
    batches = _tokenize(loaded.tokenizer, texts, seq_len, batch_size)
    lab = torch.tensor(labels, dtype=torch.long)
    label_batches = [x[:, None] for x in lab.split(batch_size)]

    def head(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (mean_pool(model, batch) @ w.T + b)[:, None, :]

    return Task("encoder", "bbc", split, batches, label_batches, head, offset)


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
    offset: int = 0,
) -> Task:
    """The task for ``loaded``'s family on ``data_id``: ``n`` windows, documents or images.

    ``offset`` picks a disjoint sample of the same size (seeds of a comparison)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise MpqError(f"n={n!r}: give a positive number of windows / documents / images")
    seq = loaded.seq_len if seq_len is None else seq_len
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 2:
        raise MpqError(f"seq_len={seq!r}: a window needs at least 2 tokens")
    limit = loaded.max_positions
    if limit is not None and seq > limit:
        raise MpqError(
            f"seq_len={seq} is longer than {loaded.model_id}'s maximum of {limit} positions; "
            f"use --seq-len {limit} or less"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise MpqError(f"batch_size={batch_size!r}: give a positive number of units per batch")
    if loaded.family == "causal_lm":
        if loaded.tokenizer is None:
            raise MpqError(f"{loaded.model_id} has no tokenizer; text evaluation needs one")
        return lm_task(loaded.tokenizer, data_id, split, seq, n, batch_size or 1, offset)
    if loaded.family == "encoder":
        if data_id != "bbc":
            raise MpqError(f"encoder models are evaluated on 'bbc' classification, not {data_id!r}")
        return encoder_task(loaded, split, n, seq, batch_size or 32, offset)
    if loaded.family == "cnn":
        if data_id != "photos":
            raise MpqError(f"CNN models are evaluated on 'photos', not {data_id!r}")
        # Held-out crops use even seeds, calibration crops odd ones: never the same images.
        seed = (0 if split == "heldout" else 1) + 2 * offset
        return cnn_task(64 if n is None else n, seed=seed, batch_size=batch_size or 16)
    raise MpqError(f"unknown model family {loaded.family!r}")


@dataclass(frozen=True)
class CalibSpec:
    """Which data a step ran on (recorded in plans so an eval can reproduce it): the data set
    id, split, number of windows / documents / images, tokens per window and batch size."""

    data: str = "wiki"
    split: str = "calib"
    n: int | None = 2
    seq_len: int | None = 128
    batch_size: int | None = None

    def task(self, loaded: LoadedModel, offset: int = 0) -> Task:
        """The :class:`Task` of this data on ``loaded``'s model family (``offset``: which
        disjoint sample, see :func:`make_task`)."""
        return make_task(
            loaded, self.data, self.split, self.n, self.seq_len, self.batch_size, offset
        )
