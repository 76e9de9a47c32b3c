"""`AutoImageProcessor` on EVE folders: our image preprocessing behind transformers' API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from eve_vlm.processing import EveImageProcessor, EveProcessor
from eve_vlm.processing.hf_image_processor import EveImageProcessorHF

# Sizes that exercise each version's geometry: square, wide, tall, and one needing a resize.
SIZES = [(64, 64), (120, 40), (40, 100), (300, 200)]


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in SIZES
    ]


def test_auto_image_processor_loads_a_saved_folder_and_gives_our_pixels(tiny_dir: Path):
    hf = AutoImageProcessor.from_pretrained(tiny_dir)
    assert type(hf) is EveImageProcessorHF
    images = _images()
    ours = EveProcessor.from_pretrained(tiny_dir).image_processor(images)
    got = hf(images)["images"]
    assert len(got) == len(ours) == len(images)
    assert len({tuple(t.shape) for t in got}) > 1  # each image keeps its own size
    for a, b in zip(got, ours, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_save_pretrained_round_trips_through_both_loaders(tiny_v2_dir: Path, tmp_path: Path):
    hf = AutoImageProcessor.from_pretrained(tiny_v2_dir)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "EveImageProcessorHF"
    again = AutoImageProcessor.from_pretrained(tmp_path)
    assert again.eve.config == hf.eve.config == EveImageProcessor.from_pretrained(tmp_path).config
    wrapped = EveImageProcessorHF.from_eve(EveImageProcessor.from_pretrained(tiny_v2_dir))
    assert wrapped.eve.config == hf.eve.config


def test_bad_arguments_are_named(tiny_v2_dir: Path):
    hf = AutoImageProcessor.from_pretrained(tiny_v2_dir)
    with pytest.raises(ValueError, match="return_tensors"):
        hf(_images()[:1], return_tensors="np")
    with pytest.raises(TypeError, match="size"):
        hf(_images()[:1], size=224)
    with pytest.raises(ValueError, match="not an EVE preprocessor config"):
        EveImageProcessorHF(do_resize=True, size=224)
