"""Exact compatibility with the official EVE implementation, on every fixture set found.

Sets live below $EVE_OFFICIAL_FIXTURES (default ../shared/fixtures/official); a set is any folder
with cases.json + cases.safetensors. New sets of the same format are picked up without code changes.
Everything goes through the public API: EveForCausalLM / EveProcessor.from_pretrained.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from eve_vlm import EveForCausalLM, EveProcessor
from eve_vlm.generate import generate
from eve_vlm.model import ClipTeacher

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ.get("EVE_OFFICIAL_FIXTURES", REPO.parent / "shared" / "fixtures" / "official"))

PIXEL_ATOL, LOGIT_ATOL, LOSS_ATOL = 1e-5, 1e-4, 1e-5


def _sets() -> list[Path]:
    if not ROOT.is_dir():
        return []
    return sorted(p.parent for p in ROOT.rglob("cases.json") if (p.parent / "cases.safetensors").is_file())


def _cases() -> list[tuple[Path, str]]:
    out = []
    for s in _sets():
        for case in json.loads((s / "cases.json").read_text())["cases"]:
            out.append((s, case["name"]))
    return out


def _id(param) -> str:
    return f"{param[0].relative_to(ROOT)}:{param[1]}" if isinstance(param, tuple) else str(param)


@cache
def _load(set_dir: Path):
    meta = json.loads((set_dir / "cases.json").read_text())
    tensors = load_file(str(set_dir / "cases.safetensors"))
    model = EveForCausalLM.from_pretrained(set_dir)
    processor = EveProcessor.from_pretrained(set_dir)
    return meta, tensors, model, processor


def _case(meta: dict, name: str) -> dict:
    return next(c for c in meta["cases"] if c["name"] == name)


def _our_pixels(set_dir: Path, meta: dict, processor, names: list[str]) -> list[torch.Tensor]:
    imgs = [Image.open(set_dir / meta["images"][n]["file"]).convert("RGB") for n in names]
    return processor.image_processor(imgs)


def _crop_to_mask(ref: torch.Tensor) -> torch.Tensor:
    """Official v1 layout [4, S, S] -> its valid RGB band (what our processor returns)."""
    mask = ref[3] > 0.5
    rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
    return ref[:3, int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]


def test_fixture_sets_exist():
    assert _sets(), f"no official fixture sets found below {ROOT}"


@pytest.mark.parametrize("set_dir", _sets(), ids=_id)
def test_pixels_match(set_dir: Path):
    meta, tensors, _, processor = _load(set_dir)
    for name in meta["images"]:
        ref = tensors[f"pixel_values.{name}"]
        img = Image.open(set_dir / meta["images"][name]["file"]).convert("RGB")
        ours = processor.image_processor([img])[0]
        if ref.shape[0] == 4:  # v1 official layout: compare the full padded layout and our cropped band
            full = processor.image_processor.official_layout([img])[0]
            assert full.shape == ref.shape
            assert (full - ref).abs().max() <= PIXEL_ATOL, name
            ref = _crop_to_mask(ref)
        assert ours.shape == ref.shape, name
        assert (ours - ref).abs().max() <= PIXEL_ATOL, name


@pytest.mark.parametrize("case_ref", _cases(), ids=_id)
def test_logits_and_loss(case_ref):
    set_dir, name = case_ref
    meta, tensors, model, processor = _load(set_dir)
    case = _case(meta, name)
    input_ids, labels = tensors[f"{name}.input_ids"], tensors[f"{name}.labels"]
    images = _our_pixels(set_dir, meta, processor, case["images"]) or None
    with torch.no_grad():
        out = model(input_ids, images=images, labels=labels)
    ref = tensors[f"{name}.logits"]
    for row, valid in enumerate(case["valid_lengths"]):
        diff = (out.logits[row, :valid] - ref[row, :valid]).abs().max().item()
        assert diff <= LOGIT_ATOL, f"row {row}: max logit diff {diff}"
    assert abs(out.loss.item() - case["loss"]) <= LOSS_ATOL
    assert out.logits.shape[1] == max(case["valid_lengths"])


@pytest.mark.parametrize(
    "case_ref", [c for c in _cases() if "train_pal_loss" in _case(_load(c[0])[0], c[1])], ids=_id
)
def test_aligning_loss(case_ref):
    set_dir, name = case_ref
    meta, tensors, _, processor = _load(set_dir)
    case = _case(meta, name)
    model = EveForCausalLM.from_pretrained(set_dir)  # fresh: attaching changes the model
    pal = load_file(str(set_dir / "pal_weights.safetensors"))
    teacher = ClipTeacher.from_pretrained(set_dir / "clip_teacher", select_layer=-2)
    model.attach_aligning_layer(teacher, {k: v for k, v in pal.items() if "vision_tower_compressor" in k})
    model.train()
    clip = torch.stack([tensors[f"pixel_values_clip.{n}"] for n in case["images"]])
    # Our processor builds the teacher input itself; it must equal the official one.
    imgs = [Image.open(set_dir / meta["images"][n]["file"]).convert("RGB") for n in case["images"]]
    t_pixels, t_masks = processor.images_for_teacher(
        imgs, teacher.image_size, teacher.patch_size, teacher.image_mean, teacher.image_std
    )
    assert (t_pixels - clip[:, :3]).abs().max() <= PIXEL_ATOL
    ref_masks = F.avg_pool2d(clip[:, 3:4], teacher.patch_size)[:, 0] > 0.5
    assert torch.equal(t_masks.bool(), ref_masks)
    out = model(
        tensors[f"{name}.input_ids"],
        images=_our_pixels(set_dir, meta, processor, case["images"]),
        labels=tensors[f"{name}.labels"],
        teacher_pixels=t_pixels,
        teacher_masks=t_masks,
    )
    assert abs(out.aligning_loss.item() - case["train_pal_loss"]) <= LOSS_ATOL
    assert abs(out.lm_loss.item() - case["train_llm_loss"]) <= LOSS_ATOL
    assert abs(out.loss.item() - case["train_total_loss"]) <= LOSS_ATOL


@pytest.mark.parametrize("case_ref", _cases(), ids=_id)
def test_greedy_generation(case_ref):
    set_dir, name = case_ref
    meta, tensors, model, processor = _load(set_dir)
    case = _case(meta, name)
    gen = case["generate"]
    input_ids = tensors[f"{name}.input_ids"]
    images = _our_pixels(set_dir, meta, processor, case["images"])
    n = gen["max_new_tokens"]
    never = [-1]  # the references ran without EOS stopping (eos never occurred)

    singles = []
    for row in range(input_ids.shape[0]):
        imgs_row = images[row : row + 1] if images else None
        singles.append(generate(model, input_ids[row : row + 1], imgs_row, max_new_tokens=n, eos_token_id=never).sequences[0])
    batched = generate(model, input_ids, images or None, max_new_tokens=n, eos_token_id=never).sequences

    if "per_sample_new_tokens" in gen:
        # The official batched result is wrong here (attends to padding); the README records the
        # clean per-sample references: ours must equal them, batched or not.
        assert singles == gen["per_sample_new_tokens"]
    elif "error" in gen:
        # The official code crashes on this batch; only per-sample consistency can be checked.
        pass
    else:
        assert singles == gen["new_tokens"]
    assert batched == singles, "a row must generate in a batch exactly what it generates alone"
