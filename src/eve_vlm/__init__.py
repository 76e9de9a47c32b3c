"""eve-vlm: encoder-free vision-language models (EVE v1 and EVEv2)."""

from __future__ import annotations

import importlib
from typing import Any

from .model import EveConfig, EveForCausalLM

__version__ = "0.1.0"
__all__ = ["EveConfig", "EveForCausalLM", "EveProcessor", "convert_llm", "convert_llm_folder", "__version__"]

# These pull in transformers tokenizers: import them only when asked for.
_LAZY = {
    "EveProcessor": "eve_vlm.processing.processor",
    "convert_llm": "eve_vlm.conversion",
    "convert_llm_folder": "eve_vlm.conversion",
}


def _register_auto_classes() -> None:
    """Make `AutoConfig`, `AutoModelForCausalLM`, `AutoModelForImageTextToText`, `AutoProcessor`
    and `AutoImageProcessor` resolve our `model_type` ("eve_vlm") and the released ones ("eve",
    "eve-qwen2"), which `EveConfig.from_dict` reads into the same class."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from .model.config import OFFICIAL_MODEL_TYPES, OUR_MODEL_TYPE
    from .processing.hf_image_processor import EveImageProcessorHF

    AutoConfig.register(OUR_MODEL_TYPE, EveConfig, exist_ok=True)
    for official in OFFICIAL_MODEL_TYPES:
        alias = type(f"EveConfig_{official.replace('-', '_')}", (EveConfig,), {"model_type": official})
        AutoConfig.register(official, alias, exist_ok=True)
    AutoModelForCausalLM.register(EveConfig, EveForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(EveConfig, EveForCausalLM, exist_ok=True)

    def processor_class() -> Any:
        return importlib.import_module("eve_vlm.processing.processor").EveProcessor

    AutoProcessor.register(EveConfig, _LazyProcessor(processor_class), exist_ok=True)
    # By class: AutoImageProcessor finds a registered class by the name in preprocessor_config.json.
    # One class for both backends: its pixels never depend on torchvision.
    AutoImageProcessor.register(
        EveConfig,
        image_processor_classes={"pil": EveImageProcessorHF, "torchvision": EveImageProcessorHF},
        exist_ok=True,
    )


class _LazyProcessor:
    """`AutoProcessor`'s entry for EVE models: imports the processor (and tokenizers) only when used."""

    def __init__(self, resolve: Any) -> None:
        self._resolve = resolve
        self.__name__ = "EveProcessor"

    def from_pretrained(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        return self._resolve().from_pretrained(path, *args, **kwargs)


_register_auto_classes()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eve_vlm' has no attribute {name!r}")
