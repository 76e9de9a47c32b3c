"""eve-vlm: encoder-free vision-language models (EVE v1 and EVEv2)."""

from __future__ import annotations

from typing import Any

from .model import EveConfig, EveForCausalLM, convert_llm

__version__ = "0.1.0"
__all__ = ["EveConfig", "EveForCausalLM", "EveProcessor", "convert_llm", "__version__"]


def __getattr__(name: str) -> Any:
    # The processor pulls in transformers tokenizers; import it only when asked for.
    if name == "EveProcessor":
        from .processing.processor import EveProcessor

        return EveProcessor
    raise AttributeError(name)
