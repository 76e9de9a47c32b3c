"""Tokenisation with image placeholders and label masking for training.

``input_ids`` carry one ``IMAGE_TOKEN_INDEX`` (-200) per image; the model expands it into that
image's visual tokens. Labels are ``IGNORE_INDEX`` everywhere except assistant answers and their
round-end token.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from .templates import ChatTemplate, ConversationError, Message, get_template, normalize_messages

_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends its BOS by default (the official code keeps that BOS)."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"] if bos is not None else []
    adds = bos is not None and len(ids) > 0 and ids[0] == bos
    try:
        _ADDS_BOS[tokenizer] = adds
    except TypeError:
        pass
    return adds


def _resolve_bos(tokenizer: Any, add_bos: bool | None) -> int | None:
    """BOS id to prepend, or None. ``add_bos=None`` follows the tokenizer's default."""
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    if not add_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    return int(bos)


def _encode_plain(text: str, tokenizer: Any) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _encode_chunks(text: str, tokenizer: Any) -> list[int]:
    """Split on ``<image>``, tokenise chunks separately, put IMAGE_TOKEN_INDEX between them."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(_encode_plain(chunk, tokenizer))
    return ids


def tokenize_with_images(text: str, tokenizer: Any, *, add_bos: bool | None = None) -> list[int]:
    """Official ``tokenizer_image_token`` semantics: chunk-wise tokenisation around ``<image>``.

    Chunks get no special tokens; a BOS is added once at the very start when ``add_bos`` (``None``:
    when the tokenizer adds one by default, as the official code keeps the first chunk's BOS).
    """
    bos = _resolve_bos(tokenizer, add_bos)
    ids = _encode_chunks(text, tokenizer)
    return [bos, *ids] if bos is not None else ids


def count_placeholders(ids: list[int]) -> int:
    return sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)


def _encode_segments(
    segments: list[tuple[str, bool]], tokenizer: Any, add_bos: bool | None
) -> tuple[list[int], list[int]]:
    """Concatenate separately tokenised pieces (adjacent pieces with the same flag merged first)."""
    merged: list[list[Any]] = []
    for text, supervised in segments:
        if merged and merged[-1][1] == supervised:
            merged[-1][0] += text
        else:
            merged.append([text, supervised])
    bos = _resolve_bos(tokenizer, add_bos)
    ids: list[int] = [] if bos is None else [bos]
    labels: list[int] = [] if bos is None else [IGNORE_INDEX]
    for text, supervised in merged:
        piece = _encode_chunks(text, tokenizer)
        ids.extend(piece)
        if supervised:
            labels.extend(IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in piece)
        else:
            labels.extend([IGNORE_INDEX] * len(piece))
    return ids, labels


def _check_images(segments: list[tuple[str, bool]], num_images: int | None) -> None:
    found = sum(text.count(IMAGE_PLACEHOLDER) for text, _ in segments)
    if num_images is not None and found != num_images:
        raise ConversationError(
            f"conversation has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given"
        )


def encode_conversation(
    messages: Any,
    tokenizer: Any,
    template: str | ChatTemplate = "vicuna_v1",
    *,
    num_images: int | None = None,
    add_bos: bool | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels for a training conversation.

    Labels keep the ids of assistant answers and the round-end token (``</s>`` / ``<|im_end|>``);
    everything else (system, user turns, role prefixes up to ``ASSISTANT:``, images, BOS) is
    ``IGNORE_INDEX``.

    Deliberate difference from the official code: the official ``preprocess_v1`` / ``preprocess_eve``
    tokenise the whole prompt and then *compute* the masked spans from token counts of re-tokenised
    sub-strings (BOS offsets, "-2 for the dangling space", "+1 for <|im_end|>"); whenever those
    counts disagree with the real tokenisation it masks the whole sample. Here each piece (prompt
    text between answers, and each answer + round-end token) is tokenised on its own and the mask
    follows the pieces, so it can never be misaligned. The ids equal the whole-string tokenisation
    whenever the tokenizer does not merge across a piece boundary (true for byte-level BPE such as
    Qwen2 / SmolLM2, whose pre-tokeniser splits before the answer's leading space and around
    special tokens). The prompt piece of a single-turn conversation is exactly what
    :func:`tokenize_with_images` produces at inference for the rendered generation prompt.
    ``num_images`` (if given) must equal the number of ``<image>`` placeholders.
    """
    tmpl = get_template(template)
    segments = tmpl.segments(messages, add_generation_prompt=False)
    if not any(supervised for _, supervised in segments):
        raise ConversationError("conversation has no assistant turn to train on")
    _check_images(segments, num_images)
    return _encode_segments(segments, tokenizer, tmpl.add_bos if add_bos is None else add_bos)


def encode_independent_turns(
    messages: Any,
    tokenizer: Any,
    template: str | ChatTemplate = "vicuna_v1",
    *,
    num_images: int | None = None,
    add_bos: bool | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """One row that trains every (user, assistant) pair of a conversation as its own single-turn
    sample about the same image(s): ids, labels and branch ids (0 = shared prefix, k = pair k).

    Why: several questions about one image are cheap to train together (the image's tokens are
    computed once), but as a dialogue later answers can be read off earlier ones ("what colour?
    red" ... "is it red? yes") instead of off the image. Here each pair k is encoded exactly as
    the single-turn conversation [system, images + question k, answer k]; the rows share their
    longest common token prefix (the model gives each branch the prefix and itself only, see
    `EveForCausalLM.forward`). Each branch keeps at least one unsupervised token before its
    answer (a branch's first token is never a target) and drops its unsupervised tail, which
    nothing reads. Images must all be in the first user turn.
    """
    msgs = normalize_messages(messages)
    system = msgs[:1] if msgs and msgs[0].role == "system" else []
    turns = msgs[len(system):]
    if len(turns) < 2 or len(turns) % 2 or any(
        m.role != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)
    ):
        raise ConversationError("independent turns need alternating user/assistant pairs, starting with the user")
    if any(m.num_images for m in turns[1:]):
        raise ConversationError(f"independent turns: every {IMAGE_PLACEHOLDER} must be in the first user turn")
    head = (IMAGE_PLACEHOLDER + "\n") * turns[0].num_images
    encoded = []
    for k in range(0, len(turns), 2):
        user = turns[k] if k == 0 else Message("user", (head + turns[k].content).strip())
        encoded.append(encode_conversation([*system, user, turns[k + 1]], tokenizer, template,
                                           num_images=num_images, add_bos=add_bos))
    supervised = [[i for i, t in enumerate(labels) if t != IGNORE_INDEX] for _, labels in encoded]
    if not all(supervised):
        raise ConversationError("independent turns: an assistant turn has no tokens to train on")
    shared = max(min(s[0] for s in supervised) - 1, 0)  # every branch starts with an unsupervised token
    ids0 = encoded[0][0]
    for ids, _ in encoded[1:]:
        shared = min(shared, next((i for i, (a, b) in enumerate(zip(ids0, ids, strict=False)) if a != b), shared))
    if any(count_placeholders(ids[shared:]) for ids, _ in encoded):
        raise ConversationError("independent turns: the image placeholders must come before the first question")
    out_ids, out_labels = list(ids0[:shared]), list(encoded[0][1][:shared])
    branches = [0] * shared
    for k, ((ids, labels), answer) in enumerate(zip(encoded, supervised, strict=True), start=1):
        end = answer[-1] + 1
        out_ids += ids[shared:end]
        out_labels += labels[shared:end]
        branches += [k] * (end - shared)
    return out_ids, out_labels, branches


def encode_prompt(
    messages: Any,
    tokenizer: Any,
    template: str | ChatTemplate = "vicuna_v1",
    *,
    num_images: int | None = None,
    add_bos: bool | None = None,
) -> list[int]:
    """Inference ids for a conversation ending in a generation prompt, tokenised piecewise exactly
    like :func:`encode_conversation` (so multi-turn history matches training tokenisation)."""
    tmpl = get_template(template)
    segments = tmpl.segments(messages, add_generation_prompt=True)
    _check_images(segments, num_images)
    return _encode_segments(segments, tokenizer, tmpl.add_bos if add_bos is None else add_bos)[0]


def encode_caption(
    caption: str,
    tokenizer: Any,
    template: str | ChatTemplate = "plain",
    *,
    num_images: int = 1,
    add_bos: bool | None = None,
) -> tuple[list[int], list[int]]:
    """Pre-training pair: official ``plain`` = ``<image>`` + caption + "\\n", only the caption supervised.

    With a BOS-adding tokenizer (v1 / LLaMA) ids are ``[BOS, IMG, caption...]``; without one
    (v2 / Qwen2) ``[IMG, caption...]``. ``num_images=0`` gives a text-only sample whose caption is
    fully supervised. The caption is stripped (as v2 does; v1 did not).
    """
    if not caption or not caption.strip():
        raise ConversationError("empty caption")
    messages = [
        {"role": "user", "content": IMAGE_PLACEHOLDER * num_images},
        {"role": "assistant", "content": caption.strip()},
    ]
    return encode_conversation(messages, tokenizer, template, num_images=num_images, add_bos=add_bos)
