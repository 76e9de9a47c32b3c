"""One call from questions + images to answers: the path evaluation, `eve ask` and demos use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core import generate
from .prompts import build_prompts, with_image_placeholders
from .sampling import GenerationConfig
from .stopping import resolve_config

if TYPE_CHECKING:
    from ..model.eve import EveForCausalLM


def answer(
    model: EveForCausalLM,
    processor: Any,
    prompts: list[str],
    images: list[list[Any]],
    *,
    max_new_tokens: int = 128,
    config: GenerationConfig | None = None,
) -> list[str]:
    """Greedy (unless `config` says otherwise), batched answers; `images[i]` belongs to `prompts[i]`.

    A prompt needs no `<image>` placeholders: missing ones are prepended
    (`with_image_placeholders`), the same rule `eve ask` follows. `config` is not modified.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    questions = [with_image_placeholders(p, len(imgs)) for p, imgs in zip(prompts, images, strict=True)]
    flat = [img for imgs in images for img in imgs]
    batch = processor(build_prompts(processor, questions), images=flat or None, padding_side="left")
    tok = processor.tokenizer
    cfg = resolve_config(
        model,
        config or GenerationConfig(max_new_tokens=max_new_tokens),
        tokenizer=tok,
        stop_strings=getattr(processor, "stop_strings", None),
    )
    result = generate(
        model, batch["input_ids"], batch.get("images"), batch["attention_mask"], config=cfg, tokenizer=tok
    )
    return [tok.decode(seq, skip_special_tokens=True).strip() for seq in result.sequences]
