"""One call from questions + images to answers: the path evaluation, `eve ask` and demos use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core import generate
from .sampling import GenerationConfig

if TYPE_CHECKING:
    from ..model.eve import EveForCausalLM


def build_prompts(processor: Any, questions: list[str]) -> list[str]:
    """Wrap each user message (with its `<image>` placeholders) in the processor's chat template."""
    return [
        processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions
    ]


def answer(
    model: EveForCausalLM,
    processor: Any,
    prompts: list[str],
    images: list[list[Any]],
    *,
    max_new_tokens: int = 128,
    config: GenerationConfig | None = None,
) -> list[str]:
    """Greedy (unless `config` says otherwise), batched answers; `images[i]` belongs to `prompts[i]`."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    texts = build_prompts(processor, prompts)
    flat = [img for imgs in images for img in imgs]
    batch = processor(texts, images=flat or None, padding_side="left")
    cfg = config or GenerationConfig(max_new_tokens=max_new_tokens)
    if not cfg.eos_token_id:
        cfg.eos_token_id = _eos_ids(model, processor)
    if not cfg.stop_strings:
        cfg.stop_strings = list(getattr(processor, "stop_strings", []) or [])
    result = generate(
        model, batch["input_ids"], batch.get("images"), batch["attention_mask"], config=cfg, tokenizer=processor.tokenizer
    )
    return [processor.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in result.sequences]


def _eos_ids(model: EveForCausalLM, processor: Any) -> list[int]:
    ids = list(model.config.eos_token_ids)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids
