"""Generated shapes data and tiny random models for the study's tests (no download, seconds)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from eve_vlm.compare.data import Question, StudyData, TrainImage


def shapes_study(folder: Path, n_train: int = 24, n_test: int = 12, seed: int = 0) -> StudyData:
    """Drawn shapes with a caption and three questions each (colour, shape, yes/no)."""
    from eve_vlm.testing import COLORS, SHAPES, draw_shape

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def image(split: str, i: int) -> tuple[Path, str, str]:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        path = folder / f"{split}-{i}.png"
        draw_shape(color, shape, seed=seed * 1000 + i + (500 if split == "test" else 0)).save(path)
        return path, color, shape

    def questions(path: Path, color: str, shape: str) -> tuple[Question, ...]:
        other = rng.choice(list(COLORS))
        return (
            Question("What color is the shape?", color, "color", path),
            Question("What shape is in the image?", shape, "shape", path),
            Question(f"Is there a {other} shape?", "yes" if other == color else "no", "yes_no", path),
        )

    train = []
    for i in range(n_train):
        path, color, shape = image("train", i)
        train.append(TrainImage(path, f"a {color} {shape}", questions(path, color, shape)))
    test = [q for i in range(n_test) for q in questions(*image("test", i))]
    return StudyData(tuple(train), tuple(test))


@pytest.fixture
def tiny_factory(tmp_path):
    """Fresh tiny random models of each kind (the same weights for the same kind every call)."""
    from eve_vlm import EveForCausalLM, EveProcessor
    from eve_vlm.testing import make_tiny_checkpoint

    def build(kind: str):
        folder = tmp_path / "tiny-models" / kind
        if not (folder / "config.json").is_file():
            if kind == "encoder":  # the installed EfficientNet-Lite0 (stride 16) on a tiny v2 decoder
                from eve_vlm.model.encoder_vision import load_pretrained_encoder

                make_tiny_checkpoint(folder, "v2", seed=0, flavour="training", vision="encoder", modality_experts=False)
                model = EveForCausalLM.from_pretrained(folder)
                load_pretrained_encoder(model)
                model.save_pretrained(folder)
            else:
                make_tiny_checkpoint(folder, "v2" if kind == "eve_v2" else "v1", seed=0, flavour="training")
        return EveForCausalLM.from_pretrained(folder), EveProcessor.from_pretrained(folder)

    return build
