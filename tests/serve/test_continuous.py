"""The continuous scheduler: greedy answers equal running alone, disconnects free rows, limits, metrics."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from eve_vlm.generate import GenerationConfig
from eve_vlm.loading import load_for_inference
from eve_vlm.serve import Batcher, ContinuousScheduler, GenRequest, QueueFullError, ServerSettings, create_app
from eve_vlm.testing import make_png

SIZES = [(48, 32), (20, 70), (64, 64), (40, 40)]


def _request(processor, k: int, stops: tuple[str, ...] = ()) -> GenRequest:
    n_img = k % 2
    ids = processor.encode_prompt(
        [{"role": "user", "content": "<image>" * n_img + "What is this? " * (1 + 3 * k)}], num_images=n_img
    )
    images = [processor.image_processor([make_png(*SIZES[k % 4], (200, 30, 30), k)])[0] for _ in range(n_img)]
    tokens = len(ids) - n_img + sum(int(processor.num_image_tokens(p)) for p in images)
    config = GenerationConfig(max_new_tokens=3 + 5 * k, stop_strings=list(stops))
    return GenRequest(ids, images, config, tokens)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_greedy_answers_batched_equal_alone(version, request):
    model, processor = load_for_inference(request.getfixturevalue(f"tiny_{version}_dir"), device="cpu")
    reqs = [_request(processor, k) for k in range(7)]
    alone = Batcher(model, processor, max_batch_size=1)
    try:
        expected = [alone.submit(r).result(60) for r in reqs]
    finally:
        alone.stop()
    text = expected[4][0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip() and "\ufffd" not in stop:  # a stop string that cuts one answer mid-way
        reqs.append(_request(processor, 4, (stop,)))
        expected.append(Batcher(model, processor, max_batch_size=1).submit(reqs[-1]).result(60))
    # 3 slots, a small prefill chunk: rows join and leave mid-decode, long prompts prefill in chunks.
    sched = ContinuousScheduler(model, processor, max_batch_size=3, prefill_chunk=24, kv_capacity=512)
    try:
        got = [t.result(60) for t in [sched.submit(r) for r in reqs]]
    finally:
        sched.stop()
    for (want, want_done), (text, done) in zip(expected, got, strict=True):
        assert text == want
        assert done.finish_reason == want_done.finish_reason
    assert max(sched.batch_sizes) == 3 and len(set(sched.batch_sizes)) > 1


def test_a_cancelled_row_frees_its_slot(tiny_v2):
    model, processor = tiny_v2
    sched = ContinuousScheduler(model, processor, max_batch_size=1, kv_capacity=512)
    try:
        req = _request(processor, 1)
        req.config.max_new_tokens = 400
        long = sched.submit(req)
        waiting = sched.submit(_request(processor, 0))
        deadline = time.monotonic() + 30
        while sched.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        long.cancel()  # what the app does when the client disconnects
        text, done = waiting.result(60)
        assert done.kind == "done"
        assert sched.cancelled_rows == 1
        assert sched.steps_run < 400
    finally:
        sched.stop()


def test_full_queue_raises(tiny_v2):
    model, processor = tiny_v2
    sched = ContinuousScheduler(model, processor, max_batch_size=1, max_queue=0)
    try:
        with pytest.raises(QueueFullError, match="max_queue=0"):
            sched.submit(_request(processor, 0))
    finally:
        sched.stop()


@pytest.fixture(scope="module")
def client(tiny_v2):
    model, processor = tiny_v2
    app = create_app(model, processor, ServerSettings(model_name="tiny", max_queue=0))
    with TestClient(app) as c:
        yield c


def _body(**extra):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def test_full_queue_gives_503_with_retry_after(client):
    resp = client.post("/v1/chat/completions", json=_body())
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "1"
    assert "max_queue" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "status", "param", "words"),
    [
        ({"model": "gpt-4o"}, 404, "model", "does not exist"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
        ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", "not null"),
        ({"max_tokens": 100_000}, 400, "max_tokens", "limit"),
    ],
)
def test_limits_and_strict_validation(client, extra, status, param, words):
    resp = client.post("/v1/chat/completions", json=_body(**extra))
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"]
    if status == 404:
        assert err["code"] == "model_not_found"


def test_image_errors_in_user_terms(client):
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    resp = client.post("/v1/chat/completions", json=_body(messages=[{"role": "user", "content": [bad]}]))
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "not a decodable image" in message and "BytesIO" not in message


def test_metrics_expose_the_series(tiny_v2):
    model, processor = tiny_v2
    app = create_app(model, processor, ServerSettings(model_name="tiny"))
    with TestClient(app) as c:
        assert c.post("/v1/chat/completions", json=_body()).status_code == 200
        assert c.post("/v1/chat/completions", json=_body(stream=True)).status_code == 200
        text = c.get("/metrics").text
    for series in (
        'eve:requests_total{status="finished"} 2.0',
        "eve:num_requests_waiting",
        "eve:num_requests_running",
        "eve:prompt_tokens_total",
        "eve:generation_tokens_total",
        "eve:time_to_first_token_seconds_bucket",
        "eve:inter_token_latency_seconds_bucket",
        "eve:e2e_request_latency_seconds_count 2.0",
    ):
        assert series in text, series
