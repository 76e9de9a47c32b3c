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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eve_vlm' has no attribute {name!r}")
