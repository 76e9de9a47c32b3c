"""Chat templates, tokenisation with image placeholders, label masking and EveProcessor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.processing import (
    ConversationError,
    EveImageConfig,
    EveImageProcessor,
    EveProcessor,
    encode_caption,
    encode_conversation,
    encode_independent_turns,
    encode_prompt,
    get_template,
    num_image_tokens,
    preset_for,
    tokenize_with_images,
)
from eve_vlm.processing.templates import VICUNA_SYSTEM

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CORPUS = [
    SYS,
    "USER: What is in the image? ASSISTANT: A cat on a mat.",
    "What color is it? It is red. Describe the picture. A red cat sits on a green mat.",
    "user assistant system caption photo of a dog",
] * 4


def _make_tokenizer(*, with_bos: bool):
    """A tiny byte-level BPE tokenizer (Qwen/GPT-2 style) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    if with_bos:  # LLaMA-like: the tokenizer prepends <s> by default
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer(with_bos=False)


@pytest.fixture(scope="module")
def tok_bos():
    return _make_tokenizer(with_bos=True)


TWO_ROUNDS = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "What color is it?"},
    {"from": "gpt", "value": "It is red."},
]


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------ templates


def test_vicuna_v1_exact_strings() -> None:
    t = get_template("vicuna_v1")
    assert t.system == VICUNA_SYSTEM == SYS
    single = [{"role": "user", "content": "<image>\nWhat is this?"}]
    assert t.render(single) == f"{SYS} USER: <image>\nWhat is this? ASSISTANT:"
    assert t.render(TWO_ROUNDS, add_generation_prompt=False) == (
        f"{SYS} USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT: It is red.</s>"
    )
    assert t.render(TWO_ROUNDS[:3]) == (
        f"{SYS} USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT:"
    )
    assert t.stop_str == "</s>"
    assert get_template("v1") is t


def test_qwen2_chatml_plain_exact_strings() -> None:
    q = get_template("qwen2")
    assert q.render(TWO_ROUNDS, add_generation_prompt=False) == (
        f"{SYS} USER: <image>\nWhat is in the image? ASSISTANT: A cat.<|im_end|>USER: What color is it? ASSISTANT: It is red.<|im_end|>"
    )
    assert q.stop_str == "<|im_end|>" and q.add_bos is False
    c = get_template("chatml")
    msgs = [{"role": "system", "content": "Be brief."}, *TWO_ROUNDS[:3]]
    assert c.render(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhat color is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    p = get_template("plain")
    caption = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": " a photo of a dog "}]
    assert p.render(caption, add_generation_prompt=False) == "<image>a photo of a dog\n"
    # a system message replaces the template's system text (two style)
    assert (
        get_template("vicuna_v1")
        .render([{"role": "system", "content": "SYS"}, TWO_ROUNDS[2]])
        .startswith("SYS USER: What color")
    )
    with pytest.raises(KeyError, match="unknown chat template"):
        get_template("nope")


def test_image_moved_to_front_and_message_formats() -> None:
    t = get_template("vicuna_v1")
    llava = [{"from": "human", "value": "Describe <image> please"}]
    openai_parts = [
        {"role": "user", "content": [{"type": "text", "text": "Describe  please"}, {"type": "image"}]}
    ]
    expected = f"{SYS} USER: <image>\nDescribe  please ASSISTANT:"
    assert t.render(llava) == expected
    assert t.render(openai_parts) == expected
    two = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}],
        }
    ]
    assert t.render(two) == f"{SYS} USER: <image>\n<image>\nCompare. ASSISTANT:"
    only_image = [{"role": "user", "content": "<image>"}]
    assert t.render(only_image) == f"{SYS} USER: <image> ASSISTANT:"


def test_malformed_conversations_raise() -> None:
    t = get_template("vicuna_v1")
    with pytest.raises(ConversationError, match="unknown role"):
        t.render([{"role": "robot", "content": "hi"}])
    with pytest.raises(ConversationError, match="should be a user"):
        t.render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ConversationError, match="only user messages"):
        t.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image> a"}])


# ------------------------------------------------------------------------------ tokenisation


def test_tokenize_with_images_chunks(tok, tok_bos) -> None:
    text = "USER: <image>\nWhat is in the image? ASSISTANT:"
    ids = tokenize_with_images(text, tok)
    assert ids == _enc(tok, "USER: ") + [IMAGE_TOKEN_INDEX] + _enc(tok, "\nWhat is in the image? ASSISTANT:")
    # BOS follows the tokenizer's default (official: first chunk keeps its BOS, others drop it)
    assert tokenize_with_images(text, tok_bos) == [tok_bos.bos_token_id] + ids
    assert tokenize_with_images(text, tok_bos, add_bos=False) == ids
    assert tokenize_with_images(text, tok, add_bos=True)[0] == tok.bos_token_id
    assert tokenize_with_images("<image><image>", tok) == [IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]
    assert tokenize_with_images("no image here", tok) == _enc(tok, "no image here")


def test_spec10_worked_v1_prompt(tok_bos) -> None:
    q = "What is this?"
    prompt = get_template("vicuna_v1").render([{"role": "user", "content": f"<image>\n{q}"}])
    expected = (
        [tok_bos.bos_token_id]
        + _enc(tok_bos, f"{SYS} USER: ")
        + [IMAGE_TOKEN_INDEX]
        + _enc(tok_bos, f"\n{q} ASSISTANT:")
    )
    assert tokenize_with_images(prompt, tok_bos) == expected


def test_two_round_label_masking_vicuna(tok_bos) -> None:
    ids, labels = encode_conversation(TWO_ROUNDS, tok_bos, "vicuna_v1", num_images=1)
    prompt1 = (
        [tok_bos.bos_token_id]
        + _enc(tok_bos, f"{SYS} USER: ")
        + [IMAGE_TOKEN_INDEX]
        + _enc(tok_bos, "\nWhat is in the image? ASSISTANT:")
    )
    answer1 = _enc(tok_bos, " A cat.</s>")
    prompt2 = _enc(tok_bos, "USER: What color is it? ASSISTANT:")
    answer2 = _enc(tok_bos, " It is red.</s>")
    assert ids == prompt1 + answer1 + prompt2 + answer2
    assert labels == [IGNORE_INDEX] * len(prompt1) + answer1 + [IGNORE_INDEX] * len(prompt2) + answer2
    # the round-end token is supervised, twice; nothing else outside the answers
    eos = tok_bos.eos_token_id
    assert answer1[-1] == eos and sum(1 for x in labels if x == eos) == 2
    supervised = [x for x in labels if x != IGNORE_INDEX]
    assert tok_bos.decode(supervised) == " A cat.</s> It is red.</s>"
    # identical to tokenising the rendered training string as a whole (no boundary drift)
    rendered = get_template("vicuna_v1").render(TWO_ROUNDS, add_generation_prompt=False)
    assert ids == tokenize_with_images(rendered, tok_bos)
    # the prompt part of round 1 equals what inference feeds for the same question
    gen = tokenize_with_images(get_template("vicuna_v1").render(TWO_ROUNDS[:1]), tok_bos)
    assert ids[: len(gen)] == gen
    assert encode_prompt(TWO_ROUNDS[:3], tok_bos, "vicuna_v1") == ids[: len(ids) - len(answer2)]


def test_two_round_label_masking_qwen2_and_chatml(tok) -> None:
    ids, labels = encode_conversation(TWO_ROUNDS, tok, "qwen2", num_images=1)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[0] != tok.bos_token_id  # no BOS for qwen2
    assert [tok.decode([x]) for x in labels if x != IGNORE_INDEX][-1] == "<|im_end|>"
    assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == " A cat.<|im_end|> It is red.<|im_end|>"
    assert sum(1 for x in labels if x == end) == 2

    ids, labels = encode_conversation(TWO_ROUNDS, tok, "chatml", num_images=1)
    rendered = get_template("chatml").render(TWO_ROUNDS, add_generation_prompt=False)
    assert ids == tokenize_with_images(rendered, tok)
    sup = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    assert tok.decode([ids[i] for i in sup]) == "A cat.<|im_end|>It is red.<|im_end|>"
    # "<|im_start|>assistant\n" and the "\n" after <|im_end|> are not supervised
    newline_after_end = [i + 1 for i, x in enumerate(ids[:-1]) if x == end]
    assert all(labels[i] == IGNORE_INDEX for i in newline_after_end)
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX


def test_encode_caption_plain(tok, tok_bos) -> None:
    ids, labels = encode_caption("a photo of a dog", tok_bos)  # v1 style
    cap = _enc(tok_bos, "a photo of a dog\n")
    assert ids == [tok_bos.bos_token_id, IMAGE_TOKEN_INDEX] + cap
    assert labels == [IGNORE_INDEX, IGNORE_INDEX] + cap
    ids, labels = encode_caption(" a photo of a dog ", tok)  # v2 style (stripped)
    assert ids == [IMAGE_TOKEN_INDEX] + cap and labels == [IGNORE_INDEX] + cap
    ids, labels = encode_caption("a photo of a dog", tok, num_images=0)  # text-only: fully supervised
    assert ids == cap and labels == cap
    with pytest.raises(ConversationError, match="empty caption"):
        encode_caption("  ", tok)


def test_placeholder_count_and_missing_answer_errors(tok) -> None:
    with pytest.raises(ConversationError, match="1 <image> placeholder.*2 image"):
        encode_conversation(TWO_ROUNDS, tok, "qwen2", num_images=2)
    with pytest.raises(ConversationError, match="no assistant turn"):
        encode_conversation(TWO_ROUNDS[:1], tok, "qwen2")


# ------------------------------------------------------------------------------ EveProcessor


def _img(w: int, h: int, value: int = 100) -> Image.Image:
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[:, : w // 2, 0] = 200
    return Image.fromarray(arr, "RGB")


V2_SMALL = EveImageConfig(version="v2", max_size=64, patch_stride=16, dense_stride=2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_processor_batch_padding(tok, side: str) -> None:
    proc = EveProcessor(EveImageProcessor(V2_SMALL), tok, "qwen2")
    texts = [
        proc.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}],
                }
            ]
        ),
        proc.apply_chat_template([{"role": "user", "content": "What color is it?"}]),
        "<image>",
    ]
    images = [_img(64, 64), _img(128, 32), _img(32, 96)]
    out = proc(texts, images, padding_side=side)
    rows = [tokenize_with_images(t, tok, add_bos=False) for t in texts]
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.long and ids.shape == (3, max(map(len, rows)))
    for i, row in enumerate(rows):
        n = len(row)
        valid = ids[i, -n:] if side == "left" else ids[i, :n]
        pads = ids[i, : ids.shape[1] - n] if side == "left" else ids[i, n:]
        assert valid.tolist() == row
        assert (pads == tok.pad_token_id).all()
        assert mask[i].sum() == n
        assert (mask[i, -n:] if side == "left" else mask[i, :n]).all()
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 3
    # images come back flat, in placeholder order, each [3, H, W] (inference rule: rescaled to ~64^2 area)
    assert [tuple(p.shape) for p in out["images"]] == [(3, 64, 64), (3, 32, 128), (3, 128, 64)]
    assert num_image_tokens(out["images"][1], V2_SMALL) == 1 + 1 * 5


def test_processor_image_count_errors_and_nested_images(tok) -> None:
    proc = EveProcessor(EveImageProcessor(V2_SMALL), tok, "qwen2")
    with pytest.raises(ValueError, match=r"1 image\(s\) given.*2 <image>.*sample 0: 1, sample 1: 1"):
        proc(["<image>a", "<image>b"], [_img(32, 32)])
    with pytest.raises(ValueError, match="sample 1 has 1 <image> placeholder.*0 image"):
        proc(["<image>a", "<image>b"], [[_img(32, 32)], []])
    out = proc(["<image>a", "b", "<image><image>c"], [[_img(32, 32)], [], [_img(64, 32), _img(32, 64)]])
    assert [tuple(p.shape) for p in out["images"]] == [(3, 64, 64), (3, 64, 96), (3, 96, 64)]
    text_only = proc("hello")
    assert text_only["images"] == [] and text_only["input_ids"].shape[0] == 1


def test_processor_misc(tok) -> None:
    proc = EveProcessor(EveImageProcessor(preset_for("eve-anyratio-res800-patch16")), tok)
    assert proc.template == "qwen2" and proc.stop_strings == ["<|im_end|>"]
    ids = tokenize_with_images("<image>What color is it?", tok)
    assert proc.decode(torch.tensor(ids)) == "What color is it?"
    assert proc.pad_token_id == tok.pad_token_id
    v1 = EveProcessor(EveImageProcessor(preset_for("eve-patch14-anypixel-672")), tok)
    assert v1.template == "vicuna_v1"
    pixels, masks = v1.images_for_teacher([_img(640, 480), _img(300, 300)])
    assert pixels.shape == (2, 3, 336, 336) and masks.shape == (2, 24, 24)
    assert masks[0].sum() == 18 * 24 and masks[1].all()
    px, mk = v1.images_for_teacher([_img(640, 480)], 224, 16, (0.5,) * 3, (0.5,) * 3)
    assert px.shape == (1, 3, 224, 224) and mk.shape == (1, 14, 14)
    with pytest.raises(ValueError, match="v1 only"):
        proc.images_for_teacher([_img(32, 32)])
    ids, labels = proc.encode_conversation(TWO_ROUNDS, num_images=1)
    assert len(ids) == len(labels) and IMAGE_TOKEN_INDEX in ids


def test_processor_save_load_round_trip(tok, tmp_path: Path) -> None:
    proc = EveProcessor(EveImageProcessor(V2_SMALL), tok, "chatml")
    proc.save_pretrained(tmp_path)
    again = EveProcessor.from_pretrained(tmp_path)
    assert again.template == "chatml"
    assert again.image_processor.config == V2_SMALL
    text = proc.apply_chat_template(TWO_ROUNDS[:1])
    a, b = proc(text, [_img(40, 50)]), again(text, [_img(40, 50)])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["images"][0], b["images"][0])
    assert again.pad_token_id == tok.pad_token_id
    assert EveProcessor.from_pretrained(tmp_path, template="qwen2").template == "qwen2"


def test_processor_from_checkpoint_without_processor_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"mm_vision_tower": "openai/eve-patch14-anypixel-1344"}))
    proc = EveProcessor.from_pretrained(tmp_path)
    assert proc.tokenizer is None and proc.version == "v1" and proc.template == "vicuna_v1"
    assert proc.image_processor.config.image_size == 1344
    with pytest.raises(ValueError, match="no tokenizer"):
        proc("hello")


# ------------------------------------------------------------------------------ independent turns


THREE_QUESTIONS = [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "What color is it?"},
    {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "Is it big?"},
    {"from": "gpt", "value": "No."},
]


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1"])
def test_independent_turns_are_single_turn_samples_sharing_a_prefix(tok, template) -> None:
    ids, labels, branches = encode_independent_turns(THREE_QUESTIONS, tok, template, num_images=1)
    assert len(ids) == len(labels) == len(branches)
    shared = branches.index(1)
    assert set(branches[:shared]) == {0} and IMAGE_TOKEN_INDEX in ids[:shared]
    for k in range(3):
        q, a = THREE_QUESTIONS[2 * k : 2 * k + 2]
        user = dict(q, value=("" if k == 0 else "<image>\n") + q["value"])
        single_ids, single_labels = encode_conversation([user, a], tok, template, num_images=1)
        span = [i for i, b in enumerate(branches) if b == k + 1]
        assert span == list(range(span[0], span[-1] + 1))  # branches are contiguous, in order
        end = max(i for i, t in enumerate(single_labels) if t != IGNORE_INDEX) + 1  # unsupervised tail dropped
        assert ids[:shared] + [ids[i] for i in span] == single_ids[:end]
        assert labels[:shared] + [labels[i] for i in span] == single_labels[:end]
        assert labels[span[0]] == IGNORE_INDEX  # a branch starts unsupervised: its first token is never a target


def test_independent_turns_single_pair_and_errors(tok) -> None:
    ids, labels, branches = encode_independent_turns(THREE_QUESTIONS[:2], tok, "chatml", num_images=1)
    single_ids, single_labels = encode_conversation(THREE_QUESTIONS[:2], tok, "chatml", num_images=1)
    assert ids == single_ids[: len(ids)] and labels == single_labels[: len(ids)]
    assert labels[branches.index(1)] == IGNORE_INDEX
    with pytest.raises(ConversationError, match="first user turn"):
        encode_independent_turns([*THREE_QUESTIONS[:2], {"from": "human", "value": "<image>\nAnd this?"},
                                  {"from": "gpt", "value": "A dog."}], tok, "chatml")
    with pytest.raises(ConversationError, match="alternating"):
        encode_independent_turns(THREE_QUESTIONS[:3], tok, "chatml")
