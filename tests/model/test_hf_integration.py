"""EveConfig / EveForCausalLM as transformers classes: Auto classes, HF `generate`, quiet loading."""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    TextIteratorStreamer,
)

import eve_vlm  # noqa: F401  (registers the Auto classes)
from eve_vlm import EveConfig, EveForCausalLM
from eve_vlm.generate import GenerationConfig, generate
from eve_vlm.processing.processor import EveProcessor
from eve_vlm.testing import make_tiny_checkpoint

FIXTURES = Path(os.environ.get("EVE_OFFICIAL_FIXTURES", Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official"))


@pytest.fixture(scope="module", params=["v1", "v2"])
def folder(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_classes_are_transformers_classes(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, EveForCausalLM) and isinstance(model, PreTrainedModel)
    assert isinstance(model.config, EveConfig) and isinstance(model.config, PretrainedConfig)
    assert isinstance(AutoConfig.from_pretrained(folder), EveConfig)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(folder), EveForCausalLM)
    assert isinstance(AutoProcessor.from_pretrained(folder), EveProcessor)
    ours = EveForCausalLM.from_pretrained(folder)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), model.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_old_config_format_still_loads(folder, tmp_path):
    """A config.json written before the config became a transformers config (no HF keys)."""
    import shutil

    shutil.copytree(folder, tmp_path / "old")
    data = json.loads((tmp_path / "old" / "config.json").read_text())
    hf_only = {"transformers_version", "architectures", "dtype", "_name_or_path", "output_hidden_states",
               "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
               "problem_type", "output_attentions"}
    (tmp_path / "old" / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k not in hf_only}))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    assert model.config == EveForCausalLM.from_pretrained(folder).config


def test_loading_is_quiet(folder, caplog, capfd):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        EveForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device="cpu")
        AutoProcessor.from_pretrained(folder)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "Loading weights" not in capfd.readouterr().err


def _inputs(processor, questions, sizes):
    prompts = [processor.apply_chat_template(_messages(q), add_generation_prompt=True) for q in questions]
    images = [Image.new("RGB", size, color) for size, color in zip(sizes, ["red", "blue", "green"], strict=False)]
    return processor(text=prompts, images=images, padding_side="left")


@pytest.mark.parametrize("sizes", [[(64, 64)], [(64, 64), (96, 48)]], ids=["single", "batched-sizes"])
def test_hf_generate_equals_ours_greedy(folder, sizes):
    model = EveForCausalLM.from_pretrained(folder)
    processor = EveProcessor.from_pretrained(folder)
    questions = ["What colour is it?", "What shape is in the image, please?"][: len(sizes)]
    inputs = _inputs(processor, questions, sizes)
    eos = model.config.eos_token_ids
    n = 12
    ours = generate(model, inputs["input_ids"], inputs["images"], inputs["attention_mask"],
                    config=GenerationConfig(max_new_tokens=n, eos_token_id=eos, pad_token_id=processor.pad_token_id))
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=processor.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    for row, seq in zip(new.tolist(), ours.sequences, strict=True):
        assert row[: len(seq)] == seq
        assert len(seq) == n or row[len(seq)] in eos  # ours drops the EOS; HF keeps it, then pads
    assert any(len(s) > 0 for s in ours.sequences)


def test_hf_generate_sampling_and_streamer(folder):
    model = EveForCausalLM.from_pretrained(folder)
    processor = EveProcessor.from_pretrained(folder)
    inputs = _inputs(processor, ["What colour is it?"], [(64, 64)])
    torch.manual_seed(0)
    a = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=5, min_new_tokens=6)
    torch.manual_seed(0)
    b = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=5, min_new_tokens=6)
    assert torch.equal(a, b) and a.shape[1] == inputs["input_ids"].shape[1] + 6
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=6, streamer=streamer))
    thread.start()
    text = "".join(streamer)
    thread.join()
    greedy = model.generate(**inputs, max_new_tokens=6)
    assert text == processor.tokenizer.decode(greedy[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)


def test_processor_output_feeds_forward_with_labels(folder):
    model = EveForCausalLM.from_pretrained(folder)
    processor = EveProcessor.from_pretrained(folder)
    inputs = _inputs(processor, ["What colour is it?"], [(64, 64)])
    labels = inputs["input_ids"].clone()
    labels[labels < 0] = -100
    out = model(**inputs, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)


OFFICIAL = sorted(p.parent for p in FIXTURES.rglob("cases.json")) if FIXTURES.is_dir() else []


@pytest.mark.skipif(not OFFICIAL, reason="official fixture sets not present")
@pytest.mark.parametrize("set_dir", OFFICIAL, ids=lambda p: p.name)
def test_auto_class_loads_official_set_quietly(set_dir, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        config = AutoConfig.from_pretrained(set_dir)
        model = AutoModelForCausalLM.from_pretrained(set_dir)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert isinstance(config, EveConfig) and isinstance(model, EveForCausalLM)
    ours = EveForCausalLM.from_pretrained(set_dir)
    assert model.config == ours.config
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), model.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
