"""Conversation templates as data, message normalisation and prompt rendering.

A template renders a conversation into *segments* ``(text, supervised)``; joining the texts gives
the prompt string, and the flags say which text is an assistant answer (trained on). Rendering and
label masking therefore share one code path, so the training prompt and the inference prompt cannot
drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..constants import IMAGE_PLACEHOLDER

Role = Literal["system", "user", "assistant"]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
EVE_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
}
_IMAGE_PART_TYPES = {"image", "image_url", "input_image"}


class ConversationError(ValueError):
    """A conversation record is malformed (data loaders count these as broken records)."""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str  # text with IMAGE_PLACEHOLDER at image positions (moved to the front for users)

    @property
    def num_images(self) -> int:
        return self.content.count(IMAGE_PLACEHOLDER)


def _content_to_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        n_images = 0
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") in _IMAGE_PART_TYPES:
                n_images += 1
            else:
                raise ConversationError(f"message {index}: unsupported content part {part!r}")
        return IMAGE_PLACEHOLDER * n_images + "\n".join(t for t in texts if t)
    raise ConversationError(f"message {index}: content must be a string or a list of parts")


def _images_to_front(text: str) -> str:
    """Official ``preprocess_multimodal``: every ``<image>`` moves to the front, each followed by "\\n"."""
    n = text.count(IMAGE_PLACEHOLDER)
    if n == 0:
        return text
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return ((IMAGE_PLACEHOLDER + "\n") * n + rest).strip()


def normalize_messages(messages: Any) -> list[Message]:
    """Accept OpenAI-style ``{"role", "content"}`` or LLaVA ``{"from", "value"}`` records."""
    if not isinstance(messages, (list, tuple)):
        raise ConversationError(f"messages must be a list, got {type(messages).__name__}")
    out: list[Message] = []
    for i, msg in enumerate(messages):
        if isinstance(msg, Message):
            out.append(msg)
            continue
        if not isinstance(msg, dict):
            raise ConversationError(f"message {i} must be a dict, got {type(msg).__name__}")
        raw_role = msg.get("role", msg.get("from"))
        role = _ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ConversationError(f"message {i} has unknown role {raw_role!r}")
        text = _content_to_text(msg.get("content", msg.get("value")), i)
        if role == "user":
            text = _images_to_front(text)
        elif IMAGE_PLACEHOLDER in text:
            raise ConversationError(
                f"message {i} ({role}) contains {IMAGE_PLACEHOLDER}; only user messages may"
            )
        out.append(Message(role, text))  # type: ignore[arg-type]
    return out


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    system = None
    rest = list(messages)
    if rest and rest[0].role == "system":
        system, rest = rest[0].content, rest[1:]
    for i, msg in enumerate(rest):
        if msg.role == "system":
            raise ConversationError(f"a system message is only allowed first (found at turn {i})")
    for i, msg in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg.role != expected:
            raise ConversationError(f"turn {i} should be a {expected} message, got {msg.role}")
    return system, rest


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation layout.

    style "two": ``{system}{sep}{USER}: {q}{sep}{ASSISTANT}: {a}{sep2}...`` (Vicuna / EVE qwen2)
    style "plain": pre-training; user text reduced to its placeholders, then ``{a}{sep}``
    style "chatml": ``{turn_start}{role}\\n{text}{sep2}{sep}`` per turn
    """

    name: str
    style: Literal["two", "plain", "chatml"]
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = ""
    stop_str: str = ""
    turn_start: str = ""
    add_bos: bool | None = None  # None: add the BOS when the tokenizer adds one by default

    def segments(self, messages: Any, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """Render to ``(text, supervised)`` pieces; supervised = assistant answer + round-end token."""
        system, turns = _split_system(normalize_messages(messages))
        system = self.system if system is None else system
        segs: list[tuple[str, bool]] = []
        user, assistant = self.roles
        if self.style == "two":
            segs.append((system + self.sep, False))
            for msg in turns:
                if msg.role == "user":
                    segs.append((f"{user}: {msg.content}{self.sep}", False))
                else:
                    segs.append((f"{assistant}:", False))
                    segs.append((f" {msg.content}{self.sep2}", True))
            if add_generation_prompt and (not turns or turns[-1].role == "user"):
                segs.append((f"{assistant}:", False))
        elif self.style == "plain":
            if system:
                segs.append((system, False))
            for msg in turns:
                if msg.role == "user":
                    segs.append((IMAGE_PLACEHOLDER * msg.num_images, False))
                else:
                    segs.append((msg.content.strip() + self.sep, True))
        elif self.style == "chatml":
            start, end = self.turn_start, self.sep2
            if system:
                segs.append((f"{start}system\n{system}{end}{self.sep}", False))
            for msg in turns:
                if msg.role == "user":
                    segs.append((f"{start}{user}\n{msg.content}{end}{self.sep}", False))
                else:
                    segs.append((f"{start}{assistant}\n", False))
                    segs.append((f"{msg.content}{end}", True))
                    segs.append((self.sep, False))
            if add_generation_prompt and (not turns or turns[-1].role == "user"):
                segs.append((f"{start}{assistant}\n", False))
        else:  # pragma: no cover - guarded by the Literal
            raise ValueError(f"unknown template style {self.style!r}")
        return [(text, sup) for text, sup in segs if text]

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """The prompt string (with ``<image>`` placeholders)."""
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate(name="plain", style="plain", roles=("", ""), sep="\n", stop_str="\n"),
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1", style="two", system=VICUNA_SYSTEM, sep=" ", sep2="</s>", stop_str="</s>"
    ),
    "eve_v1": ChatTemplate(
        name="eve_v1", style="two", system=EVE_V1_SYSTEM, sep=" ", sep2="</s>", stop_str="</s>"
    ),
    "qwen2": ChatTemplate(
        name="qwen2",
        style="two",
        system=VICUNA_SYSTEM,
        sep=" ",
        sep2="<|im_end|>",
        stop_str="<|im_end|>",
        add_bos=False,
    ),
    "chatml": ChatTemplate(
        name="chatml",
        style="chatml",
        roles=("user", "assistant"),
        sep="\n",
        sep2="<|im_end|>",
        stop_str="<|im_end|>",
        turn_start="<|im_start|>",
        add_bos=False,
    ),
}
_ALIASES = {"v1": "vicuna_v1", "vicuna": "vicuna_v1", "qwen": "qwen2", "eve_v2": "qwen2"}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """Look up a template by name (``plain``, ``vicuna_v1``, ``eve_v1``, ``qwen2``, ``chatml``)."""
    if isinstance(name, ChatTemplate):
        return name
    key = _ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[key]


def default_template_for(version: str) -> str:
    """The template the official training scripts use per EVE version (v1: vicuna_v1, v2: qwen2)."""
    return {"v1": "vicuna_v1", "v2": "qwen2"}[version]
