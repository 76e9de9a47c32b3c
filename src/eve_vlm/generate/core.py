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
from .stopping import resolve_config
from .text import TextDeltas

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
    res = result if result is not None else GenerationResult([], [])
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
    logits = out.logits[:, -1]
    seen = None  # [rows, vocab] tokens already in prompt or output; only a penalty needs them
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(b, logits.shape[-1], dtype=torch.bool, device=device)
        prompt = input_ids.clamp(min=0).masked_fill(~mask.bool(), 0)
        seen.scatter_(1, prompt, mask.bool() & (input_ids >= 0))
    eos = set(config.eos_token_id)
    max_stop = max((len(s) for s in config.stop_strings), default=0)
    active = list(range(b))
    for n_new in range(1, config.max_new_tokens + 1):
        nxt = select_next(logits, seen, config, generator)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        # The step's one device-to-host transfer; consumers need the tokens on the host anyway,
        # so EOS and stop checks run there rather than as extra kernels and syncs.
        tokens = nxt.tolist()
        finished: list[int] = []
        for row, token in zip(active, tokens, strict=True):
            if token in eos:
                res.finish_reasons[row] = "eos"
                finished.append(row)
                continue
            seq = res.sequences[row]
            seq.append(token)
            if max_stop and _hit_stop(seq, tokenizer, config.stop_strings, max_stop):
                res.finish_reasons[row] = "stop"
                finished.append(row)
        yield Step(rows=active, tokens=tokens, finished=finished)
        if finished:
            done = set(finished)
            keep = [k for k, row in enumerate(active) if row not in done]
            if not keep:
                break
            keep_t = torch.tensor(keep, device=device)
            cache.select_rows(keep_t)
            seen = seen[keep_t] if seen is not None else None
            nxt = nxt[keep_t]
            active = [active[k] for k in keep]
        if n_new == config.max_new_tokens:
            break
        step_ids = nxt[:, None]
        out = model(step_ids, attention_mask=torch.ones_like(step_ids), past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    if b == 1:
        res.cache = cache


def _hit_stop(seq: list[int], tokenizer: Any, stops: list[str], max_stop: int) -> bool:
    """Check the tail of a row's text for a stop string; trim the tokens that produced it."""
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
    """Generate for a (left-padded) batch; returns the new tokens of every row.

    Without explicit `eos_token_id`, rows end at `eos_token_ids(model.config, tokenizer)`.
    """
    cfg = resolve_config(model, config, tokenizer=tokenizer, **kwargs)
    res = GenerationResult([], [])
    steps = iter_generate(
        model,
        input_ids,
        images,
        attention_mask,
        config=cfg,
        tokenizer=tokenizer,
        past_key_values=past_key_values,
        result=res,
    )
    for _ in steps:
        pass
    return res


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
    tok = processor.tokenizer
    cfg = resolve_config(
        model, config, tokenizer=tok, stop_strings=getattr(processor, "stop_strings", None), **kwargs
    )
    res = result if result is not None else GenerationResult([], [])
    deltas = TextDeltas(tok, input_ids.shape[0], cfg.stop_strings)
    steps = iter_generate(
        model,
        input_ids,
        images,
        attention_mask,
        config=cfg,
        tokenizer=tok,
        past_key_values=past_key_values,
        result=res,
    )
    for step in steps:
        for row in step.rows:
            piece = deltas.delta(row, res.sequences[row])
            if piece:
                yield row, piece
    for row, seq in enumerate(res.sequences):
        piece = deltas.delta(row, seq, final=True)
        if piece:
            yield row, piece
