"""The easy-VQA dataset (pip ``easy-vqa``) as eve-vlm training and evaluation records.

Why: no image-caption or VQA corpus installs offline except easy-VQA (64x64 images of one coloured
shape on a white background, 13 answers). Its questions give most images' shape and colour (the
pixels give the rest), from which we derive captions for the pre-training stages; the questions themselves are the SFT data.

Records use the LLaVA conversation layout that the eve-vlm data loader reads:
``{"id", "image": <absolute path>, "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}``.
Captions are caption pairs in that same layout (human turn = ``"<image>"`` only, gpt turn = caption),
so pre-training and SFT data share one loader; no separate ``{"image", "caption"}`` form is made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from eve_vlm.constants import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]
# The generator paints each shape in one exact RGB value (checked: it separates all 4,630 images
# whose colour the questions state) on a slightly tinted off-white background.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
QUESTION_TYPES = ("color", "shape", "yes_no")
PIP_HINT = "pip install easy-vqa==1.0"

CAPTION_TEMPLATES = (
    "A {color} {shape}.",
    "A {color} {shape} on a white background.",
    "There is a {color} {shape} on a white background.",
    "The image shows a {color} {shape}.",
    "A picture of a {color} {shape}.",
    "This image contains one {color} {shape}.",
    "A single {color} {shape} on a plain white background.",
    "A simple drawing of a {color} {shape}.",
)

_NEGATION = re.compile(r"\b(not|no)\b")
_WORDS = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class EasyVQAQuestion:
    """One question about one image; ``question_type`` is "color", "shape" or "yes_no"."""

    text: str
    answer: str
    image_id: int
    question_type: str


@dataclass
class EasyVQASplit:
    """A split: image paths by id, its questions, and each image's shape and colour (from its
    questions where they say it, else from its pixels)."""

    split: str
    image_paths: dict[int, Path]
    questions: list[EasyVQAQuestion]
    shapes: dict[int, str] = field(default_factory=dict)
    colors: dict[int, str] = field(default_factory=dict)


def question_type(answer: str) -> str:
    """Type of a question from its answer: easy-VQA answers are colours, shapes or yes/no."""
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    if answer in YES_NO:
        return "yes_no"
    raise ValueError(f"unknown easy-VQA answer {answer!r}")


def _attributes(questions: Sequence[EasyVQAQuestion]) -> tuple[dict[int, str], dict[int, str]]:
    """Recover each image's shape and colour from what its questions assert to be present."""
    found: dict[str, dict[int, set[str]]] = {"shape": defaultdict(set), "color": defaultdict(set)}
    for q in questions:
        words = set(_WORDS.findall(q.text))
        colors = words.intersection(COLORS)
        shapes = words.intersection(SHAPES)
        if q.question_type == "yes_no":
            present = (q.answer == "yes") != bool(_NEGATION.search(q.text))
            if not present:
                continue
        elif q.question_type == "color":
            colors = {q.answer}
        else:
            shapes = {q.answer}
        found["color"][q.image_id].update(colors)
        found["shape"][q.image_id].update(shapes)
    result = []
    for kind in ("shape", "color"):
        conflicts = {i: v for i, v in found[kind].items() if len(v) > 1}
        if conflicts:
            raise ValueError(f"easy-VQA questions disagree on the {kind} of images {sorted(conflicts)[:5]}")
        result.append({i: next(iter(v)) for i, v in found[kind].items() if v})
    return result[0], result[1]


def pixel_attributes(path: str | Path) -> tuple[str, str]:
    """(shape, colour) read off the pixels: the fallback for the ~11% of images whose questions
    never state one of them.

    Colour = palette entry that most near-exact pixels match. Shape = fill ratio of the shape's
    bounding box: on all images labelled by questions, triangles fill 0.50-0.66, circles 0.74-0.91,
    rectangles 0.96-1.0, so thresholds at 0.70 and 0.93 separate them.
    """
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    height, width, _ = pixels.shape
    flat = pixels.reshape(-1, 3)
    palette = np.array(list(PALETTE.values()), dtype=np.int32)
    dist = np.square(flat[:, None, :] - palette[None]).sum(-1)  # [N, colours]
    near = dist.min(1) < 30**2
    if not near.any() or near.all():
        raise ValueError(f"{path}: no single palette-coloured shape found")
    k = int(np.bincount(dist.argmin(1)[near], minlength=len(palette)).argmax())
    background = np.median(flat[~near], axis=0)
    mask = (dist[:, k] < np.square(flat - background).sum(-1)).reshape(height, width)
    rows, cols = np.nonzero(mask)
    fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "triangle" if fill < 0.70 else "circle" if fill < 0.93 else "rectangle"
    return shape, COLORS[k]


@lru_cache(maxsize=2)
def load_easy_vqa(split: Split) -> EasyVQASplit:
    """Load one easy-VQA split from the installed package (cached: records are rebuilt often)."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    try:
        import easy_vqa
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"package 'easy-vqa' is not installed; run: {PIP_HINT}") from err
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    questions = [
        EasyVQAQuestion(text=t, answer=a, image_id=int(i), question_type=question_type(a))
        for t, a, i in zip(texts, answers, image_ids, strict=True)
    ]
    image_paths = {int(i): Path(p).resolve() for i, p in sorted(paths.items())}
    missing = {q.image_id for q in questions} - image_paths.keys()
    if missing:
        raise ValueError(f"easy-VQA {split}: questions refer to unknown images {sorted(missing)[:5]}")
    shapes, colors = _attributes(questions)
    unlabelled = sorted(image_paths.keys() - (shapes.keys() & colors.keys()))
    for image_id in unlabelled:
        shape, color = pixel_attributes(image_paths[image_id])
        shapes.setdefault(image_id, shape)
        colors.setdefault(image_id, color)
    logger.debug("easy-VQA %s: %d images labelled from pixels", split, len(unlabelled))
    logger.info("easy-VQA %s: %d images, %d questions", split, len(image_paths), len(questions))
    return EasyVQASplit(split, image_paths, questions, shapes, colors)


def caption_records(
    split: Split, captions_per_image: int = 1, seed: int = 0, templates: Sequence[str] = CAPTION_TEMPLATES
) -> list[dict]:
    """LLaVA caption pairs (one per image and phrasing) for the pre-training stages.

    Each image gets ``captions_per_image`` distinct phrasings of "a <colour> <shape>", chosen with a
    per-image RNG so the output is deterministic for a given ``seed``.
    """
    if not 1 <= captions_per_image <= len(templates):
        raise ValueError(f"captions_per_image must be in 1..{len(templates)}, got {captions_per_image}")
    data = load_easy_vqa(split)
    records = []
    for image_id, path in data.image_paths.items():
        rng = random.Random(seed * 1_000_003 + image_id)
        for k, template in enumerate(rng.sample(list(templates), captions_per_image)):
            caption = template.format(color=data.colors[image_id], shape=data.shapes[image_id])
            records.append(
                {
                    "id": f"easyvqa-{split}-cap-{image_id}-{k}",
                    "image": str(path),
                    "conversations": [
                        {"from": "human", "value": IMAGE_PLACEHOLDER},
                        {"from": "gpt", "value": caption},
                    ],
                }
            )
    return records


def qa_records(split: Split) -> list[dict]:
    """LLaVA single-turn VQA records, one per question, tagged with ``question_type``."""
    data = load_easy_vqa(split)
    return [
        {
            "id": f"easyvqa-{split}-qa-{n}",
            "image": str(data.image_paths[q.image_id]),
            "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q.text}"},
                {"from": "gpt", "value": q.answer},
            ],
            "question_type": q.question_type,
        }
        for n, q in enumerate(data.questions)
    ]


def save_records(records: Sequence[dict], path: str | Path) -> Path:
    """Write records as JSON Lines (``.jsonl``) or one JSON list (any other suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(list(records), fh, ensure_ascii=False)
    return path


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace: "  Red. " and "red" score the same."""
    return " ".join(text.lower().translate(_PUNCT).split())


def answer_prior(train_split: EasyVQASplit) -> dict[str, str]:
    """Most common training answer for each question string (the blind, image-free baseline)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for q in train_split.questions:
        counts[q.text][q.answer] += 1
    return {text: c.most_common(1)[0][0] for text, c in counts.items()}


def prior_predictions(prior: Mapping[str, str], split: EasyVQASplit, fallback: str = "yes") -> list[str]:
    """Answer every question of ``split`` from ``prior``; question strings never seen get ``fallback``."""
    return [prior.get(q.text, fallback) for q in split.questions]


def score_answers(predictions: Sequence[str] | Mapping[int, str], split: EasyVQASplit) -> dict:
    """Accuracy overall and per question type.

    ``predictions`` is aligned with ``split.questions`` (a sequence) or maps question index ->
    answer (missing indices count as wrong). Returns ``{"accuracy", "count", "per_type":
    {type: {"accuracy", "count"}}}``.
    """
    n = len(split.questions)
    if not isinstance(predictions, Mapping):
        if len(predictions) != n:
            raise ValueError(
                f"got {len(predictions)} predictions for {n} questions in easy-VQA {split.split}"
            )
        predictions = dict(enumerate(predictions))
    correct: Counter = Counter()
    total: Counter = Counter()
    for idx, q in enumerate(split.questions):
        pred = predictions.get(idx)
        hit = pred is not None and normalize_answer(pred) == normalize_answer(q.answer)
        correct[q.question_type] += hit
        total[q.question_type] += 1
    per_type = {t: {"accuracy": correct[t] / total[t], "count": total[t]} for t in QUESTION_TYPES if total[t]}
    return {"accuracy": sum(correct.values()) / max(n, 1), "count": n, "per_type": per_type}


def _load_pixels(paths: Sequence[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


@lru_cache(maxsize=2)
def dataset_pixel_stats(
    split: Split = "train",
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of the split's pixels in [0, 1] (use the training split).

    Why: easy-VQA images are mostly white, so ImageNet/CLIP statistics would leave inputs far from
    zero mean; the quickstart normalises with these instead.
    """
    pixels = _load_pixels(list(load_easy_vqa(split).image_paths.values())).reshape(-1, 3)
    mean = pixels.mean(axis=0, dtype=np.float64) / 255.0
    sq = np.square(pixels, dtype=np.float64).mean(axis=0) / 255.0**2
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def image_content_hashes(split: EasyVQASplit) -> dict[str, Path]:
    """MD5 of each image's decoded RGB bytes -> path (duplicates collapse onto one key)."""
    from PIL import Image

    return {
        hashlib.md5(Image.open(p).convert("RGB").tobytes()).hexdigest(): p for p in split.image_paths.values()
    }


def overlapping_images(a: EasyVQASplit, b: EasyVQASplit) -> list[tuple[Path, Path]]:
    """Image pairs shared by two splits, by path or by identical pixels (ids overlap by design:
    both splits number their images from 0, so ids alone say nothing)."""
    shared_paths = set(a.image_paths.values()) & set(b.image_paths.values())
    ha, hb = image_content_hashes(a), image_content_hashes(b)
    pairs = {(p, p) for p in shared_paths} | {(ha[h], hb[h]) for h in ha.keys() & hb.keys()}
    return sorted(pairs)
