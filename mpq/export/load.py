"""``mpq.load(DIR)``: rebuild the packed model of an mpq-format or mpq Hugging Face folder.

The architecture comes from the folder's ``config.json`` (or, for models without one, from the
bundled model id recorded in the plan), the formats from the plan (``plan.json`` or
``config.json``'s ``quantization_config``), the tensors from ``model.safetensors``. Every file
is checked against the sha256 in ``mpq_manifest.json`` first (a folder without one is refused
unless ``verify=False``; files it does not list are reported); packed tensors are checked
against the plan by :func:`mpq.executor.load_packed`. The result computes exactly what the
packed model computed before export (same tensors, same reference kernels).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.export.common import MANIFEST, Manifest, verify_checksums
from mpq.export.mpq_format import PLAN, QUANT_METHOD, WEIGHTS
from mpq.models import TOKENIZER_FILES, linearize_conv1d
from mpq.plan import BitPlan
from mpq.targets import Target, discover

log = logging.getLogger("mpq.export")


@dataclass
class LoadedExport:
    """What :func:`load_export` rebuilt: the packed ``model`` (eval mode), its ``plan`` and
    ``targets``, the export ``format`` (``mpq`` or ``hf``), the tokenizer (None when the folder
    has none) and the manifest (None for a Hugging Face folder without one)."""

    model: nn.Module
    plan: BitPlan
    targets: list[Target]
    folder: Path
    format: str
    tokenizer: Any = None
    manifest: Manifest | None = None
    unlisted: list[str] = field(default_factory=list)  # files the manifest does not list


def load(
    folder: str | os.PathLike[str], *, backend: str = "reference", verify: bool = True
) -> nn.Module:
    """The quantized model stored in an export folder (``mpq export --format mpq|hf``).
    ``verify=False`` loads a folder without its manifest (unchecked: at your own risk)."""
    return load_export(folder, backend=backend, verify=verify).model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MpqError(f"{str(path)!r} is not readable JSON ({exc}); export again") from None
    if not isinstance(obj, dict):
        raise MpqError(f"{str(path)!r} must hold a JSON object; export again")
    return obj


def load_export(
    folder: str | os.PathLike[str], *, backend: str = "reference", verify: bool = True
) -> LoadedExport:
    """Rebuild an export folder; see the module docstring. Raises :class:`MpqError` for a
    folder that is not an mpq/hf export, a missing manifest (unless ``verify=False``), changed
    files, or tensors that do not fit the plan. Files the manifest does not list are reported
    (logger ``mpq.export``) and listed in ``LoadedExport.unlisted``."""
    from mpq.executor import load_packed

    root = Path(folder)
    if not root.is_dir():
        raise MpqError(f"export folder {str(root)!r} does not exist; give the --out of mpq export")
    manifest = Manifest.read(root) if (root / MANIFEST).is_file() else None
    unlisted: list[str] = []
    if manifest is None and verify:
        raise MpqError(
            f"{str(root)!r} has no {MANIFEST}, so its files cannot be checked against what mpq "
            f"wrote; export the model again, or pass verify=False to load it unchecked"
        )
    if manifest is not None:
        if manifest.format not in ("mpq", "hf"):
            raise MpqError(
                f"{str(root)!r} holds a {manifest.format!r} export; mpq.load reads the mpq and "
                f"hf formats (load GGUF with llama.cpp, compressed-tensors with vLLM or "
                f"transformers)"
            )
        if verify:
            verify_checksums(root, manifest)
        unlisted = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file()
            and p.name != MANIFEST
            and p.relative_to(root).as_posix() not in manifest.files
        )
        if unlisted:
            log.warning(
                "%s holds files its %s does not list (not written by mpq export): %s",
                root, MANIFEST, ", ".join(unlisted[:10]),
            )  # fmt: skip
    config = _read_json(root / "config.json") if (root / "config.json").is_file() else None
    quant = (config or {}).get("quantization_config")
    if isinstance(quant, dict):
        if quant.get("quant_method") != QUANT_METHOD:
            raise MpqError(
                f"{str(root)!r} is quantized with {quant.get('quant_method')!r}, not mpq; load "
                f"it with the library that wrote it"
            )
        plan = BitPlan.from_dict(quant.get("plan"))
        fmt = "hf"
    elif (root / PLAN).is_file():
        plan = BitPlan.load(root / PLAN)
        fmt = "mpq"
    else:
        raise MpqError(
            f"{str(root)!r} is not an mpq export: it has neither {PLAN} nor a config.json with "
            f"quantization_config quant_method 'mpq'; export with `mpq export --format mpq`"
        )
    if not (root / WEIGHTS).is_file():
        raise MpqError(f"{str(root / WEIGHTS)!r} is missing; export the model again")
    arch = _architecture(root, config, plan)
    # No tie rules: ties constrain the solve, not the file (a plan solved with --no-ties gives
    # q, k and v their own formats and must load as written).
    found = {t.name: t for t in discover(arch, (), (), ())}
    unknown = [n for n in plan.formats if n not in found]
    if unknown:
        raise MpqError(
            f"the plan names layers the model in {str(root)!r} does not have: {unknown[:3]}; "
            f"the folder's config and plan belong to different models: export again"
        )
    targets = [found[n] for n in found if n in plan.formats]
    model = load_packed(arch, targets, root / WEIGHTS, plan, backend=backend)
    model.eval()
    return LoadedExport(
        model=model,
        plan=plan,
        targets=targets,
        folder=root,
        format=fmt,
        tokenizer=_tokenizer(root),
        manifest=manifest,
        unlisted=unlisted,
    )


def _architecture(root: Path, config: dict[str, Any] | None, plan: BitPlan) -> nn.Module:
    """An fp32 model of the right architecture (its weights are overwritten by the file)."""
    if config is None:
        from mpq.models import load_model
        from mpq.registry import MODELS

        if plan.model_id not in MODELS:
            raise MpqError(
                f"{str(root)!r} has no config.json and its plan's model {plan.model_id!r} is not "
                f"a bundled id; export the model again with its config"
            )
        return load_model(plan.model_id).model
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = cfg_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise MpqError(f"{str(root / 'config.json')!r} has no model_type; export again")
    try:
        cfg = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise MpqError(f"{str(root / 'config.json')!r} is not a usable config: {exc}") from None
    archs = cfg_dict.get("architectures") or []
    import transformers

    cls: Any = getattr(transformers, str(archs[0]), None) if archs else None
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager"}
    torch.manual_seed(0)  # the random init is overwritten; seeded so loading is reproducible
    model: nn.Module
    if cls is not None and hasattr(cls, "_from_config"):
        model = cls._from_config(cfg, **kwargs)  # the exact class the config names
    else:
        causal = any(str(a).endswith("ForCausalLM") for a in archs)
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(cfg, **kwargs)
    linearize_conv1d(model)  # as mpq.models loaded it: GPT-2's Conv1D as nn.Linear
    return model.eval()


def _tokenizer(root: Path) -> Any:
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root))
    except (OSError, ValueError):
        return None
