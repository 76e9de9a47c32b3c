"""The study's data: training images (each with a caption and its questions) and held-out questions.

Every model of a grid reads the same records in the same order, so differences in accuracy come
from the models, not from the data. A smaller data fraction is a prefix of a larger one (one seeded
order of the images), so the data axis adds images without changing the ones already there.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import QUESTION_TYPES


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    kind: str  # one of QUESTION_TYPES
    image: Path


@dataclass(frozen=True)
class TrainImage:
    image: Path
    caption: str
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class StudyData:
    """Training images in their seeded order and the held-out questions every evaluation scores."""

    train: tuple[TrainImage, ...]
    test: tuple[Question, ...]

    def __post_init__(self) -> None:
        bad = {q.kind for q in self.test} - set(QUESTION_TYPES)
        if bad:
            raise ValueError(f"unknown question types {sorted(bad)}; known: {QUESTION_TYPES}")
        if not self.train or not self.test:
            raise ValueError("the study needs training images and held-out questions")

    def fraction(self, fraction: float) -> tuple[TrainImage, ...]:
        """The first `fraction` of the training images (at least one)."""
        return self.train[: max(1, round(fraction * len(self.train)))]


def easy_vqa_data(eval_questions: int, seed: int) -> StudyData:
    """easy-VQA (the quickstart's offline copy): captions "a <colour> <shape>" as the quickstart's
    stages 1-2 use, every training question, and `eval_questions` seeded test questions."""
    from ..quickstart.easy_vqa_data import load_easy_vqa

    train, test = load_easy_vqa("train"), load_easy_vqa("test")
    by_image: dict[int, list[Question]] = {i: [] for i in train.image_paths}
    for q in train.questions:
        by_image[q.image_id].append(Question(q.text, q.answer, q.question_type, train.image_paths[q.image_id]))
    images = [
        TrainImage(path, f"a {train.colors[i]} {train.shapes[i]}", tuple(by_image[i]))
        for i, path in train.image_paths.items()
    ]
    random.Random(seed).shuffle(images)
    picked = list(range(len(test.questions)))
    random.Random(seed + 1).shuffle(picked)
    held_out = tuple(
        Question(q.text, q.answer, q.question_type, test.image_paths[q.image_id])
        for q in (test.questions[i] for i in sorted(picked[:eval_questions]))
    )
    return StudyData(tuple(images), held_out)


def write_records(images: Sequence[TrainImage], folder: Path, questions_per_sample: int, seed: int) -> dict[str, Path]:
    """captions.jsonl (one caption record per image) and qa.jsonl (each image's questions in rows of
    at most `questions_per_sample`, split evenly), both in one seeded order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions: list[dict[str, Any]] = [
        {"id": f"cap-{n}", "image": str(im.image),
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": im.caption}]}
        for n, im in enumerate(images)
    ]
    qa: list[dict[str, Any]] = []
    for n, im in enumerate(images):
        qs = list(im.questions)
        rng.shuffle(qs)
        chunks = -(-len(qs) // questions_per_sample)
        for part in range(chunks):
            turns = []
            for k, q in enumerate(qs[part::chunks]):
                turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q.text})
                turns.append({"from": "gpt", "value": q.answer})
            qa.append({"id": f"qa-{n}-{part}", "image": str(im.image), "conversations": turns})
    rng.shuffle(captions)
    rng.shuffle(qa)
    paths = {"captions": folder / "captions.jsonl", "qa": folder / "qa.jsonl"}
    for key, records in (("captions", captions), ("qa", qa)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
