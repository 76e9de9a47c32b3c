"""Multi-turn conversations for the quickstart: stage-3 training records and a held-out evaluation.

Single questions teach a model to read an image; a chat also needs it to answer a follow-up about
the same image with its own earlier answers in the context, and to answer about a new image once
the user attaches one (`/image` in `eve chat`). Stage 3 therefore mixes two kinds of dialogue
records into its independent-question rows, and the report scores both situations on held-out
images, with the model's own answers as the history, as in a chat.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..generate import GenerationConfig, generate, resolve_config, with_image_placeholders
from .easy_vqa_data import EasyVQAQuestion, EasyVQASplit, normalize_answer

SAME_IMAGE_TURNS = 3  # questions in a conversation about one image
# Of the dialogue records, this share follows up on one image and the rest switch to a second
# image: attending to the newest image with another one in the context is the harder skill.
FOLLOW_UP_SHARE = 0.4
SWITCH_TURNS = (2, 2)  # questions about the first image, then about the second
# answers generated per held-out pair: a follow-up conversation and an image-switch one (two turns)
EVAL_TURNS_PER_PAIR = SAME_IMAGE_TURNS + 2


def _turn(question: EasyVQAQuestion, with_image: bool) -> list[dict[str, str]]:
    text = with_image_placeholders(question.text, 1) if with_image else question.text
    return [{"from": "human", "value": text}, {"from": "gpt", "value": question.answer}]


def dialogue_questions(questions: list[EasyVQAQuestion], n: int, rng: random.Random) -> list[EasyVQAQuestion]:
    """`n` of one image's questions in random order, as a user asks them in a chat.

    Why random: every question type then trains at every turn. An order that keeps answers from
    following from earlier ones (a yes/no question first, then colour and shape) never trains a
    yes/no question in a later turn, and the model answered those far worse (78% at the third turn
    against 97% at the first, bench/multiturn_errors.py). Answers that the conversation gives away
    ("what colour? red", then "is there a red shape?") stay in: a chat model should agree with
    its own earlier answers.
    """
    return rng.sample(questions, min(n, len(questions)))


def dialogue_records(split: EasyVQASplit, fraction: float, seed: int) -> list[dict[str, Any]]:
    """Dialogue records for `fraction` of the images: `FOLLOW_UP_SHARE` of them a conversation of
    `SAME_IMAGE_TURNS` questions about one image, the rest one that switches to a second image after
    `SWITCH_TURNS[0]` questions, their questions in `dialogue_questions` order. Each record is
    trained as one dialogue (`independent_turns` false), so later answers see the earlier turns."""
    rng = random.Random(seed * 7919 + 17)
    by_image: dict[int, list[EasyVQAQuestion]] = defaultdict(list)
    for q in split.questions:
        by_image[q.image_id].append(q)
    ids = sorted(i for i, qs in by_image.items() if len(qs) >= SAME_IMAGE_TURNS)
    rng.shuffle(ids)
    chosen = ids[: round(fraction * len(ids))]
    records = []
    follow_ups = round(FOLLOW_UP_SHARE * len(chosen))
    for k, image_id in enumerate(chosen):
        if k < follow_ups:
            qs = dialogue_questions(by_image[image_id], SAME_IMAGE_TURNS, rng)
            turns = [t for j, q in enumerate(qs) for t in _turn(q, j == 0)]
            images = [str(split.image_paths[image_id])]
        else:
            other = rng.choice(ids)
            while other == image_id:
                other = rng.choice(ids)
            first = dialogue_questions(by_image[image_id], SWITCH_TURNS[0], rng)
            second = dialogue_questions(by_image[other], SWITCH_TURNS[1], rng)
            turns = [t for j, q in enumerate(first) for t in _turn(q, j == 0)]
            turns += [t for j, q in enumerate(second) for t in _turn(q, j == 0)]
            images = [str(split.image_paths[image_id]), str(split.image_paths[other])]
        records.append({"id": f"dialogue-{image_id}-{k}", "image": images, "conversations": turns,
                        "independent_turns": False})
    return records


@dataclass
class Conversation:
    """A held-out conversation: its questions in order, the image each one comes with (None: no
    new image), and which answers are scored."""

    questions: list[EasyVQAQuestion]
    new_image: list[Path | None]
    scored: list[bool]
    kind: str  # "follow_up" or "image_switch"


def held_out_conversations(split: EasyVQASplit, count: int, seed: int) -> list[Conversation]:
    """`count` conversations of each kind: questions 2-3 about one image are scored, and the first
    question after a switch to a second image."""
    rng = random.Random(seed * 104_729 + 3)
    by_image: dict[int, list[EasyVQAQuestion]] = defaultdict(list)
    for q in split.questions:
        by_image[q.image_id].append(q)
    ids = sorted(i for i, qs in by_image.items() if len(qs) >= SAME_IMAGE_TURNS)
    convs = []
    for image_id in rng.sample(ids, min(count, len(ids))):
        qs = rng.sample(by_image[image_id], SAME_IMAGE_TURNS)
        path = split.image_paths[image_id]
        convs.append(Conversation(qs, [path] + [None] * (len(qs) - 1), [False] + [True] * (len(qs) - 1), "follow_up"))
    for _ in range(count):
        a, b = rng.sample(ids, 2)
        qa, qb = rng.choice(by_image[a]), rng.choice(by_image[b])
        convs.append(Conversation([qa, qb], [split.image_paths[a], split.image_paths[b]], [False, True], "image_switch"))
    return convs


def evaluate_conversations(
    model: Any, processor: Any, conversations: Sequence[Conversation], *, batch_size: int = 32, max_new_tokens: int = 4
) -> dict[str, Any]:
    """Greedy answers turn by turn, each conversation carrying its own earlier answers; accuracy of
    the scored turns overall, by kind and by question type."""
    from PIL import Image

    history: list[list[dict[str, str]]] = [[] for _ in conversations]
    images: list[list[Any]] = [[] for _ in conversations]
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    cfg = resolve_config(model, GenerationConfig(max_new_tokens=max_new_tokens), tokenizer=processor.tokenizer,
                         stop_strings=getattr(processor, "stop_strings", None))
    model.eval()
    for turn in range(max(len(c.questions) for c in conversations)):
        active = [i for i, c in enumerate(conversations) if turn < len(c.questions)]
        for start in range(0, len(active), batch_size):
            chunk = active[start : start + batch_size]
            prompts, pixels = [], []
            for i in chunk:
                conv = conversations[i]
                path = conv.new_image[turn]
                text = conv.questions[turn].text
                if path is not None:
                    images[i].append(Image.open(path).convert("RGB"))
                    text = with_image_placeholders(text, 1)
                history[i].append({"role": "user", "content": text})
                prompts.append(processor.apply_chat_template(history[i], add_generation_prompt=True))
                pixels.append(list(images[i]))
            batch = processor(prompts, images=[p for ps in pixels for p in ps], padding_side="left")
            out = generate(model, batch["input_ids"], batch.get("images"), batch["attention_mask"], config=cfg,
                           tokenizer=processor.tokenizer)
            for i, seq in zip(chunk, out.sequences, strict=True):
                reply = processor.tokenizer.decode(seq, skip_special_tokens=True).strip()
                history[i].append({"role": "assistant", "content": reply})
                conv = conversations[i]
                if conv.scored[turn]:
                    q = conv.questions[turn]
                    ok = normalize_answer(reply) == normalize_answer(q.answer)
                    for key in ("all", conv.kind, q.question_type):
                        hits[key][0] += ok
                        hits[key][1] += 1
    total = hits["all"]
    return {
        "accuracy": total[0] / max(total[1], 1),
        "count": total[1],
        "by_kind": {k: v[0] / v[1] for k, v in sorted(hits.items()) if k in ("follow_up", "image_switch")},
        "per_type": {k: v[0] / v[1] for k, v in sorted(hits.items()) if k in ("color", "shape", "yes_no")},
    }
