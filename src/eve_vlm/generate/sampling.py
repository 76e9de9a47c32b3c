"""Next-token selection: repetition penalty, temperature, top-k, top-p, greedy; batched."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class GenerationConfig:
    """Hugging Face-like generation arguments: the one sampling type of `generate`, chat and the server.

    Empty `eos_token_id` / `stop_strings` mean "the model's and the template's", filled in by
    `eve_vlm.generate.stopping.resolve_config`.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.temperature == 0:  # the common "temperature 0 means greedy" convention
            self.do_sample = False


def apply_repetition_penalty(logits: Tensor, seen: Tensor | None, penalty: float) -> Tensor:
    """CTRL-style penalty on tokens already in the prompt or output (`seen` is a [B, V] bool mask).

    With penalty 1 nothing changes, and callers may skip keeping `seen` at all (None).
    """
    if penalty == 1.0 or seen is None:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop tokens once the mass *before* them already exceeds top_p (keeps at least one).
        drop_sorted = probs.cumsum(dim=-1) - probs > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_next(
    logits: Tensor, seen: Tensor | None, cfg: GenerationConfig, generator: torch.Generator | None
) -> Tensor:
    """[B, V] float logits -> [B] next token ids (`seen` may be None when there is no penalty)."""
    logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / max(cfg.temperature, 1e-5), cfg.top_k, cfg.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
