"""When an answer ends: the one EOS rule, and the defaults every generation entry point fills in.

`generate`, `stream_text`, `answer`, chat and the server all resolve their settings here, so an
answer ends at the same token whichever entry point produced it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .sampling import GenerationConfig

if TYPE_CHECKING:
    from ..model.eve import EveForCausalLM


def eos_token_ids(model_config: Any, tokenizer: Any = None) -> list[int]:
    """The ids that end an answer: the model config's EOS ids plus the tokenizer's EOS id.

    Both are needed because checkpoints disagree: a chat model's config often names the base
    model's end-of-text id while its tokenizer names the end-of-turn id the template emits.
    `tokenizer` may be a tokenizer, a processor holding one, or None.
    """
    ids = list(getattr(model_config, "eos_token_ids", []) or [])
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    eos = getattr(tok, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    return ids


def resolve_config(
    model: EveForCausalLM,
    config: GenerationConfig | None = None,
    *,
    tokenizer: Any = None,
    stop_strings: list[str] | None = None,
    **kwargs: Any,
) -> GenerationConfig:
    """A copy of `config` (or one built from `kwargs`) with EOS ids and stop strings filled in.

    Empty `eos_token_id` means `eos_token_ids(model.config, tokenizer)`; empty `stop_strings`
    means the given defaults (usually the chat template's). The caller's config is never changed.
    """
    if config is not None and kwargs:
        raise ValueError("pass either a GenerationConfig or keyword arguments, not both")
    cfg = GenerationConfig(**kwargs) if config is None else config
    return dataclasses.replace(
        cfg,
        eos_token_id=list(cfg.eos_token_id) or eos_token_ids(model.config, tokenizer),
        stop_strings=list(cfg.stop_strings) or list(stop_strings or []),
    )
