"""Prompt text: the one `<image>` placeholder rule and the chat-template wrapping of a question."""

from __future__ import annotations

from typing import Any

from ..constants import IMAGE_PLACEHOLDER


def with_image_placeholders(prompt: str, n_images: int) -> str:
    """`prompt` with one `<image>` placeholder per image, the missing ones prepended.

    A prompt may place its placeholders itself ("Compare <image> and <image>"); placeholders it
    lacks go in front, each on its own line, the layout the models were trained on. More
    placeholders than images cannot be satisfied and raise ValueError.
    """
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found > n_images:
        raise ValueError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but only {n_images} image(s) were given"
        )
    return (IMAGE_PLACEHOLDER + "\n") * (n_images - found) + prompt


def build_prompts(processor: Any, questions: list[str]) -> list[str]:
    """Wrap each user message (with its `<image>` placeholders) in the processor's chat template."""
    return [
        processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
