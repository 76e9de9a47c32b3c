"""The batcher on its own: request stop strings cut the text exactly, and batching never changes it."""

from __future__ import annotations

import pytest

from eve_vlm.generate import GenerationConfig, answer
from eve_vlm.serve import Batcher, GenRequest
from eve_vlm.serve.batcher import batch_key
from eve_vlm.testing import make_png

PNG = make_png(48, 32, (200, 30, 30), 0)
QUESTION = "What is this?"


@pytest.fixture(scope="module")
def batcher(tiny_v2):
    model, processor = tiny_v2
    b = Batcher(model, processor, max_batch_size=4, max_wait_ms=50)
    yield b
    b.stop()


def _request(processor, config: GenerationConfig) -> GenRequest:
    ids = processor.encode_prompt([{"role": "user", "content": "<image>" + QUESTION}], num_images=1)
    return GenRequest(input_ids=ids, images=[processor.image_processor([PNG])[0]], config=config)


def test_stop_strings_cut_the_text_wherever_they_fall(batcher, tiny_v2):
    model, processor = tiny_v2
    full = answer(model, processor, [QUESTION], [[PNG]], max_new_tokens=24)[0]
    full_tokens = batcher.submit(_request(processor, GenerationConfig(max_new_tokens=24))).result(60)[1]
    # Stops of several lengths starting at several places, so some span token boundaries.
    stops = {full[i : i + n] for i in range(2, len(full) - 4, 3) for n in (1, 3, 5)}
    stops = {s for s in stops if s.strip() and "\ufffd" not in s}
    assert len(stops) > 3
    tickets = {
        s: batcher.submit(_request(processor, GenerationConfig(max_new_tokens=24, stop_strings=[s])))
        for s in stops
    }
    for stop, ticket in tickets.items():
        text, done = ticket.result(60)
        assert text == full[: full.index(stop)].lstrip(), stop
        assert done.finish_reason == "stop"
        assert done.completion_tokens <= full_tokens.completion_tokens
    assert max(batcher.batch_sizes) > 1, "requests with different stops share batches"


def test_batch_keys():
    greedy = GenerationConfig(temperature=0.0, stop_strings=["x"])
    assert batch_key(greedy, 1) == batch_key(GenerationConfig(), 2)
    seeded = GenerationConfig(do_sample=True, temperature=0.7, seed=3)
    assert batch_key(seeded, 1) != batch_key(seeded, 2)
    sampled = GenerationConfig(do_sample=True, temperature=0.7)
    assert batch_key(sampled, 1) == batch_key(GenerationConfig(do_sample=True, temperature=0.7), 2)
    assert batch_key(sampled, 1) != batch_key(GenerationConfig(do_sample=True, temperature=0.9), 1)
