"""``transformers.AutoModel*.from_pretrained`` on an ``mpq export --format hf`` folder.

``import mpq.hf`` registers quant method ``"mpq"`` with transformers
(``register_quantization_config`` / ``register_quantizer``). Loading such a folder then:

1. before the weights load, tells the loader that the targets' fp weights are absent and their
   packed tensors (``qweight``, ``scales``, ``qzeros``) are expected, so neither is reported;
2. after loading, rebuilds the folder with :func:`mpq.export.load.load_export` (which checks
   every file against ``mpq_manifest.json`` and the packed tensors against the plan) and puts
   its packed modules and tensors in, so the result computes exactly what ``mpq.load(DIR)``
   computes.

Without ``import mpq.hf`` transformers does not know ``quant_method: "mpq"``: it logs "Unknown
quantization type ... we will skip the quantization" and leaves every quantized weight randomly
initialized (see README).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from mpq.errors import MpqError
from mpq.export.mpq_format import QUANT_METHOD


class MpqHfConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an mpq hf folder, kept as the dict mpq wrote."""

    def __init__(self, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self._fields = {k: v for k, v in kwargs.items() if k != "quant_method"}
        for k, v in self._fields.items():
            setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **self._fields}


def _folder(model: Any) -> Path:
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    path = Path(str(name))
    if not path.is_dir():
        raise MpqError(
            f"mpq can load quant_method 'mpq' only from a local export folder, not {name!r}; "
            f"download the folder and pass its path"
        )
    return path


class MpqHfQuantizer(HfQuantizer):
    """Loads mpq's packed modules into a transformers model (pre-quantized folders only)."""

    requires_calibration = True

    def _plan(self) -> Any:
        from mpq.plan import BitPlan

        return BitPlan.from_dict(self.quantization_config.to_dict().get("plan"))

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """The target weights are not in the file (their packed tensors are): tell the loader
        so it reports neither; both are filled after loading."""
        names = [re.escape(n) for n in self._plan().formats]
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        by_module = {id(m): n for n, m in model.named_modules()}
        tied = getattr(model.config, "tie_word_embeddings", False)
        if tied and out_emb is not None and by_module.get(id(in_emb)) in self._plan().formats:
            names.append(re.escape(by_module[id(out_emb)]))  # the tied head: an alias
        if names:
            block = "|".join(names)
            missing = set(model._keys_to_ignore_on_load_missing or ())
            unexpected = set(model._keys_to_ignore_on_load_unexpected or ())
            model._keys_to_ignore_on_load_missing = missing | {rf"^(?:{block})\.weight$"}
            model._keys_to_ignore_on_load_unexpected = unexpected | {
                rf"^(?:{block})\.(?:qweight|scales|qzeros|weight|bias|packed\..*)$"
            }
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """Put in the packed modules of :func:`~mpq.export.load.load_export` (same objects, so
        tied targets stay tied) and its every other tensor."""
        from mpq.export.load import load_export
        from mpq.kernels.modules import QuantConv2d, QuantEmbedding, QuantLinear, RowMixLinear

        loaded = load_export(_folder(model))
        quant = (QuantLinear, QuantConv2d, QuantEmbedding, RowMixLinear)
        for name, module in loaded.model.named_modules():
            if isinstance(module, quant):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module)
        result = model.load_state_dict(loaded.model.state_dict(), strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise MpqError(
                f"the transformers model and mpq's rebuild of {str(_folder(model))!r} differ "
                f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
                f"load the folder with mpq.load instead"
            )
        model.eval()
        return model

    def update_attn_implementation(self, config: Any) -> Any:
        """Eager attention, as :func:`mpq.load` builds it, unless the caller asked for one."""
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "eager"
        return config

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register quant method ``"mpq"`` with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MpqHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MpqHfQuantizer)


register()
