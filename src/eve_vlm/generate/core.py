"""Batched generation with a KV cache, streaming, stop strings; rows leave the batch when done.

Prompts are left-padded so every row's next token lands in the same column; each row keeps its
own RoPE positions and key-validity mask, so a row generates exactly what it generates alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..model.decoder import KVCache
from .sampling import GenerationConfig, select_next

if TYPE_CHECKING:
    from ..model.eve import EveForCausalLM


@dataclass
class Step:
    """One decoding step: the new token of each still-active row (indices into the batch)."""

    rows: list[int]
    tokens: list[int]
    finished: list[int] = field(default_factory=list)  # rows that ended at this step


@dataclass
class GenerationResult:
    sequences: list[list[int]]  # new tokens per row (EOS and stop-string tokens excluded)
    finish_reasons: list[str]  # "eos", "stop" or "length"
    cache: KVCache | None = None  # the cache after generation (batch of 1 only; for chat reuse)


def make_config(model: EveForCausalLM, config: GenerationConfig | None = None, **kwargs: Any) -> GenerationConfig:
    cfg = config or GenerationConfig(**kwargs)
    if config is not None and kwargs:
        raise ValueError("pass either a GenerationConfig or keyword arguments, not both")
    if not cfg.eos_token_id:
        cfg.eos_token_id = model.config.eos_token_ids
    return cfg


@torch.inference_mode()
def iter_generate(
    model: EveForCausalLM,
    input_ids: Tensor,
    images: list[Tensor] | Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    config: GenerationConfig,
    tokenizer: Any = None,
    past_key_values: KVCache | None = None,
    result: GenerationResult | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated token position; fills `result` (if given) as it goes."""
    device = model.device
    input_ids = input_ids.to(device)
    b = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the output")
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    res = result if result is not None else GenerationResult([[] for _ in range(b)], ["length"] * b)
    res.sequences = [[] for _ in range(b)]
    res.finish_reasons = ["length"] * b
    if config.max_new_tokens == 0:
        return

    out = model(
        input_ids,
        images=images,
        attention_mask=mask,
        past_key_values=past_key_values,
        use_cache=True,
        padding_side="left",
        logits_to_keep=1,
    )
    cache = out.past_key_values
    vocab = out.logits.shape[-1]
    seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
    if config.repetition_penalty != 1.0:
        prompt = input_ids.clamp(min=0).masked_fill(~mask.bool(), 0)
        seen.scatter_(1, prompt, (mask.bool() & (input_ids >= 0)))
    eos = torch.tensor(config.eos_token_id or [-1], device=device)
    active = list(range(b))
    logits = out.logits[:, -1]
    max_stop = max((len(s) for s in config.stop_strings), default=0)
    for _ in range(config.max_new_tokens):
        nxt = select_next(logits, seen, config, generator)
        seen[torch.arange(len(active), device=device), nxt] = True
        tokens = nxt.tolist()
        is_eos = torch.isin(nxt, eos).tolist()
        step = Step(rows=list(active), tokens=tokens)
        keep: list[int] = []
        for k, row in enumerate(active):
            if is_eos[k]:
                res.finish_reasons[row] = "eos"
                step.finished.append(row)
                continue
            res.sequences[row].append(tokens[k])
            if max_stop and _hit_stop(res, row, tokenizer, config.stop_strings, max_stop):
                res.finish_reasons[row] = "stop"
                step.finished.append(row)
                continue
            keep.append(k)
        yield step
        if not keep:
            break
        if len(keep) < len(active):
            keep_t = torch.tensor(keep, device=device)
            cache.select_rows(keep_t)
            seen = seen[keep_t]
            nxt = nxt[keep_t]
            active = [active[k] for k in keep]
        if len(res.sequences[active[0]]) >= config.max_new_tokens:
            break
        out = model(nxt[:, None], attention_mask=torch.ones_like(nxt[:, None]), past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    if b == 1:
        res.cache = cache


def _hit_stop(res: GenerationResult, row: int, tokenizer: Any, stops: list[str], max_stop: int) -> bool:
    """Check the tail of the row's text for a stop string; trim the tokens that produced it."""
    seq = res.sequences[row]
    tail_tokens = max_stop + 4
    tail = tokenizer.decode(seq[-tail_tokens:], skip_special_tokens=False)
    if not any(s in tail for s in stops):
        return False
    # Drop tokens from the end while the stop string is still contained in the decoded text.
    while seq:
        text = tokenizer.decode(seq[-tail_tokens:], skip_special_tokens=False)
        if any(s in text for s in stops):
            seq.pop()
        else:
            break
    return True


def generate(
    model: EveForCausalLM,
    input_ids: Tensor,
    images: list[Tensor] | Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    config: GenerationConfig | None = None,
    tokenizer: Any = None,
    past_key_values: KVCache | None = None,
    **kwargs: Any,
) -> GenerationResult:
    """Generate for a (left-padded) batch; returns the new tokens of every row."""
    cfg = make_config(model, config, **kwargs)
    res = GenerationResult([], [])
    for _ in iter_generate(
        model, input_ids, images, attention_mask, config=cfg, tokenizer=tokenizer, past_key_values=past_key_values, result=res
    ):
        pass
    return res


class TextDeltas:
    """Turns growing token lists into printable text deltas (holds back incomplete UTF-8)."""

    def __init__(self, tokenizer: Any, rows: int, stop_strings: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.emitted = [""] * rows
        self.stops = [s for s in (stop_strings or []) if s]

    def delta(self, row: int, tokens: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - self._stop_prefix_len(text)]
        piece = text[len(self.emitted[row]) :] if text.startswith(self.emitted[row]) else ""
        self.emitted[row] = text
        return piece

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that could be the start of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best


def stream_text(
    model: EveForCausalLM,
    processor: Any,
    input_ids: Tensor,
    images: list[Tensor] | Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    config: GenerationConfig | None = None,
    result: GenerationResult | None = None,
    past_key_values: KVCache | None = None,
    **kwargs: Any,
) -> Iterator[tuple[int, str]]:
    """Yield `(row, text_piece)` as tokens arrive; the pieces of a row concatenate to its answer."""
    cfg = make_config(model, config, **kwargs)
    if not cfg.stop_strings:
        cfg.stop_strings = list(getattr(processor, "stop_strings", []) or [])
    tok = processor.tokenizer
    res = result if result is not None else GenerationResult([], [])
    deltas = TextDeltas(tok, input_ids.shape[0], cfg.stop_strings)
    for step in iter_generate(
        model, input_ids, images, attention_mask, config=cfg, tokenizer=tok, past_key_values=past_key_values, result=res
    ):
        for row in step.rows:
            piece = deltas.delta(row, res.sequences[row])
            if piece:
                yield row, piece
    for row, seq in enumerate(res.sequences):
        piece = deltas.delta(row, seq, final=True)
        if piece:
            yield row, piece
