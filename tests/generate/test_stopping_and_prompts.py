"""One EOS rule for every entry point, configs left as given, and one `<image>` placeholder rule."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from eve_vlm.generate import (
    GenerationConfig,
    answer,
    build_prompts,
    eos_token_ids,
    generate,
    stream_text,
    with_image_placeholders,
)
from eve_vlm.testing import make_png

IMAGE = make_png(48, 32, (200, 30, 30), 0)
QUESTION = "<image>\nWhat is this?"


def _inputs(processor, question: str = QUESTION, images: list | None = None):
    images = [IMAGE] if images is None else images
    batch = processor(build_prompts(processor, [question]), images=images or None, padding_side="left")
    return batch["input_ids"], batch["images"], batch["attention_mask"]


@pytest.fixture
def eos_only_in_tokenizer(tiny_v2, monkeypatch):
    """The tiny model with a config EOS it never emits and a tokenizer whose EOS it emits at step 5.

    Returns (model, processor, the answer without any EOS, index where the tokenizer's EOS is).
    """
    model, processor = tiny_v2
    full = generate(model, *_inputs(processor), max_new_tokens=12, eos_token_id=[-1]).sequences[0]
    eos = full[5]
    unused = next(i for i in range(len(processor.tokenizer)) if i not in full)
    monkeypatch.setattr(model.config, "eos_token_id", unused)
    tok = copy.deepcopy(processor.tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    assert tok.eos_token_id == eos
    monkeypatch.setattr(processor, "tokenizer", tok)
    return model, processor, full, full.index(eos)


def test_eos_token_ids_joins_config_and_tokenizer(eos_only_in_tokenizer):
    model, processor, full, first = eos_only_in_tokenizer
    ids = eos_token_ids(model.config, processor)
    assert ids == [model.config.eos_token_id, full[first]]
    assert eos_token_ids(model.config, processor.tokenizer) == ids
    assert eos_token_ids(model.config) == [model.config.eos_token_id]


def test_generate_stops_at_the_tokenizers_eos(eos_only_in_tokenizer):
    model, processor, full, first = eos_only_in_tokenizer
    tok = processor.tokenizer
    ended = generate(model, *_inputs(processor), max_new_tokens=12, tokenizer=tok)
    assert ended.finish_reasons == ["eos"]
    assert ended.sequences[0] == full[:first]
    # Without a tokenizer only the model config's EOS is known, which this model never emits.
    assert generate(model, *_inputs(processor), max_new_tokens=12).finish_reasons == ["length"]
    # stream_text and answer follow the same rule.
    expected = tok.decode(full[:first], skip_special_tokens=True).strip()
    streamed = "".join(
        piece for _, piece in stream_text(model, processor, *_inputs(processor), max_new_tokens=12)
    )
    assert streamed.strip() == expected
    assert answer(model, processor, [QUESTION], [[IMAGE]], max_new_tokens=12) == [expected]


def test_callers_config_is_not_modified(tiny_v2):
    model, processor = tiny_v2
    cfg = GenerationConfig(max_new_tokens=6)
    before = dataclasses.asdict(cfg)
    answer(model, processor, [QUESTION], [[IMAGE]], config=cfg)
    list(stream_text(model, processor, *_inputs(processor), config=cfg))
    generate(model, *_inputs(processor), config=cfg, tokenizer=processor.tokenizer)
    assert dataclasses.asdict(cfg) == before
    assert cfg.eos_token_id == [] and cfg.stop_strings == []


def test_with_image_placeholders():
    assert with_image_placeholders("What is this?", 1) == "<image>\nWhat is this?"
    assert with_image_placeholders("What is this?", 2) == "<image>\n<image>\nWhat is this?"
    assert with_image_placeholders("Compare <image> with", 2) == "<image>\nCompare <image> with"
    assert with_image_placeholders("<image>\nWhat?", 1) == "<image>\nWhat?"
    assert with_image_placeholders("Hello", 0) == "Hello"
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        with_image_placeholders("<image> and <image>", 1)
    with pytest.raises(ValueError):
        with_image_placeholders("<image>", 0)


def test_answer_adds_missing_placeholders(tiny_v2):
    model, processor = tiny_v2
    second = make_png(20, 70, (0, 0, 200), 1)
    explicit = answer(
        model,
        processor,
        [QUESTION, "<image>\n<image>\nCompare."],
        [[IMAGE], [IMAGE, second]],
        max_new_tokens=8,
    )
    implicit = answer(
        model, processor, ["What is this?", "Compare."], [[IMAGE], [IMAGE, second]], max_new_tokens=8
    )
    assert implicit == explicit
    with pytest.raises(ValueError, match="placeholder"):
        answer(model, processor, ["<image> <image> Two?"], [[IMAGE]], max_new_tokens=4)
