"""Generation core against a tiny random model: batching, streaming, sampling, stops, EOS."""

from __future__ import annotations

import torch

from eve_vlm.generate import GenerationConfig, answer, build_prompts, generate, stream_text
from eve_vlm.generate.sampling import filter_top_k_top_p, select_next
from eve_vlm.testing import make_png

# Images of different sizes and aspect ratios (wide, tall, square) and one text-only prompt.
IMAGES = [
    make_png(48, 32, (200, 30, 30), 0),
    make_png(20, 70, (0, 0, 200), 1),
    make_png(40, 40, (20, 180, 20), 2),
]
QUESTIONS = [
    "<image>\nWhat is this?",
    "Describe <image> please.",
    "<image>\nHow many shapes?",
    "Tell me a story.",
]
IMAGE_LISTS = [[IMAGES[0]], [IMAGES[1]], [IMAGES[2]], []]


def _batch(processor, questions, image_lists):
    flat = [img for imgs in image_lists for img in imgs]
    return processor(build_prompts(processor, questions), images=flat or None, padding_side="left")


def test_batch_equals_single(tiny):
    model, processor = tiny
    batched = answer(model, processor, QUESTIONS, IMAGE_LISTS, max_new_tokens=12)
    singles = [
        answer(model, processor, [q], [imgs], max_new_tokens=12)[0]
        for q, imgs in zip(QUESTIONS, IMAGE_LISTS, strict=True)
    ]
    assert batched == singles
    assert len(set(singles)) > 1, "the tiny model should answer different inputs differently"


def test_batch_token_ids_equal_single(tiny_v2):
    model, processor = tiny_v2
    cfg = GenerationConfig(max_new_tokens=10)
    batch = _batch(processor, QUESTIONS, IMAGE_LISTS)
    res = generate(model, batch["input_ids"], batch["images"], batch["attention_mask"], config=cfg)
    for i, (q, imgs) in enumerate(zip(QUESTIONS, IMAGE_LISTS, strict=True)):
        one = _batch(processor, [q], [imgs])
        single = generate(model, one["input_ids"], one["images"] or None, one["attention_mask"], config=cfg)
        assert res.sequences[i] == single.sequences[0]
        assert res.finish_reasons[i] == single.finish_reasons[0]


def test_stream_pieces_concatenate_to_answer(tiny):
    model, processor = tiny
    batch = _batch(processor, QUESTIONS, IMAGE_LISTS)
    pieces: dict[int, list[str]] = {i: [] for i in range(len(QUESTIONS))}
    for row, piece in stream_text(
        model, processor, batch["input_ids"], batch["images"], batch["attention_mask"], max_new_tokens=12
    ):
        pieces[row].append(piece)
    expected = answer(model, processor, QUESTIONS, IMAGE_LISTS, max_new_tokens=12)
    streamed = ["".join(p).strip() for _, p in sorted(pieces.items())]
    assert streamed == expected
    assert any(len(p) > 1 for p in pieces.values()), "text should arrive in several pieces"


def test_seeded_sampling_is_deterministic(tiny_v2):
    model, processor = tiny_v2

    def sample(seed: int) -> list[str]:
        cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=seed)
        return answer(model, processor, QUESTIONS, IMAGE_LISTS, config=cfg)

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    greedy = answer(model, processor, QUESTIONS, IMAGE_LISTS, max_new_tokens=12)
    assert first != greedy


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_v2):
    model, processor = tiny_v2
    greedy = answer(model, processor, QUESTIONS, IMAGE_LISTS, max_new_tokens=10)
    top_k = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=2.0, top_k=1, seed=3)
    top_p = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1e-6, seed=3)
    assert answer(model, processor, QUESTIONS, IMAGE_LISTS, config=top_k) == greedy
    assert answer(model, processor, QUESTIONS, IMAGE_LISTS, config=top_p) == greedy
    temp0 = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.0, seed=3)
    assert not temp0.do_sample
    assert answer(model, processor, QUESTIONS, IMAGE_LISTS, config=temp0) == greedy


def test_filter_top_k_top_p_keeps_the_right_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept_k = torch.isfinite(filter_top_k_top_p(logits, 2, 1.0))
    assert kept_k.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    kept_p = torch.isfinite(filter_top_k_top_p(logits, 0, float(probs[0] + 0.01)))
    assert kept_p.tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.5)).sum() == 1


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    seen = torch.zeros_like(logits, dtype=torch.bool)

    def top_share(t: float) -> float:
        cfg = GenerationConfig(do_sample=True, temperature=t)
        picks = select_next(logits, seen, cfg, torch.Generator().manual_seed(0))
        return float((picks == 0).float().mean())

    cold, warm, hot = top_share(0.2), top_share(1.0), top_share(5.0)
    assert cold > 0.99
    assert abs(warm - float(logits[0].softmax(-1)[0])) < 0.03
    assert hot < warm - 0.2


def test_repetition_penalty_changes_choice_and_avoids_repeats(tiny_v2):
    model, processor = tiny_v2
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert select_next(logits, seen, GenerationConfig(repetition_penalty=1.0), None).item() == 0
    assert select_next(logits, seen, GenerationConfig(repetition_penalty=2.0), None).item() == 1

    q, imgs = QUESTIONS[:1], IMAGE_LISTS[:1]
    batch = _batch(processor, q, imgs)
    plain = generate(model, batch["input_ids"], batch["images"], batch["attention_mask"], max_new_tokens=24)
    penalised = generate(
        model,
        batch["input_ids"],
        batch["images"],
        batch["attention_mask"],
        max_new_tokens=24,
        repetition_penalty=1e4,
    )
    seq = penalised.sequences[0]
    prompt = set(batch["input_ids"][0].tolist())
    assert len(seq) == len(set(seq)), "a huge penalty must prevent repeated tokens"
    assert not prompt & set(seq), "prompt tokens are penalised too"
    assert plain.sequences[0] != seq


def test_stop_strings_cut_the_answer(tiny_v2):
    model, processor = tiny_v2
    tok = processor.tokenizer
    batch = _batch(processor, QUESTIONS[:1], IMAGE_LISTS[:1])
    args = (model, batch["input_ids"], batch["images"], batch["attention_mask"])
    full = generate(*args, max_new_tokens=16)
    full_text = tok.decode(full.sequences[0], skip_special_tokens=True)
    stop = next(
        full_text[i : i + 2] for i in range(4, len(full_text) - 2) if "\ufffd" not in full_text[i : i + 2]
    )
    cut = generate(*args, max_new_tokens=16, stop_strings=[stop], tokenizer=tok)
    text = tok.decode(cut.sequences[0], skip_special_tokens=True)
    assert cut.finish_reasons == ["stop"]
    assert stop not in text
    assert full_text.startswith(text)
    # Tokens are kept up to (not including) the one that completed the stop string.
    assert len(text) < full_text.find(stop) + len(stop)
    assert len(cut.sequences[0]) < len(full.sequences[0])


def test_eos_ends_generation(tiny_v2):
    model, processor = tiny_v2
    batch = _batch(processor, QUESTIONS[:1], IMAGE_LISTS[:1])
    args = (model, batch["input_ids"], batch["images"], batch["attention_mask"])
    full = generate(*args, max_new_tokens=12, eos_token_id=[-1])
    assert full.finish_reasons == ["length"] and len(full.sequences[0]) == 12
    k = 5
    eos = full.sequences[0][k]
    first = full.sequences[0].index(eos)
    ended = generate(*args, max_new_tokens=12, eos_token_id=[eos])
    assert ended.finish_reasons == ["eos"]
    assert ended.sequences[0] == full.sequences[0][:first]
    assert generate(*args, max_new_tokens=0).sequences == [[]]
