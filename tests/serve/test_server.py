"""The OpenAI-compatible server: validation (4xx naming the field), batching, streaming, concurrency."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from eve_vlm.generate import GenerationConfig, answer
from eve_vlm.loading import load_for_inference
from eve_vlm.serve import ServerLimits, ServerSettings, create_app
from eve_vlm.serve.server import start_background_server
from eve_vlm.testing import make_png

PNGS = [
    make_png(48, 32, (200, 30, 30), 0),
    make_png(20, 70, (0, 0, 200), 1),
    make_png(40, 40, (20, 180, 20), 2),
]
QUESTIONS = ["What is this?", "Describe it.", "How many shapes?", "What colour is it?"]


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def user(text: str, *images: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def tiny(tiny_v2_dir):
    """(model, processor) of the tiny v2 checkpoint, loaded the way `eve serve` loads a model."""
    return load_for_inference(tiny_v2_dir, device="cpu")


@pytest.fixture(scope="module")
def client(tiny):
    model, processor = tiny
    limits = ServerLimits(
        max_body_bytes=200_000, max_image_pixels=64 * 64, max_images=2, max_output_tokens=64
    )
    app = create_app(model, processor, ServerSettings(model_name="tiny", limits=limits))
    with TestClient(app) as c:
        yield c


def expected_answer(tiny, question: str, pngs: list[bytes], max_new_tokens: int, **cfg) -> str:
    model, processor = tiny
    prompt = "<image>\n" * len(pngs) + question
    config = GenerationConfig(max_new_tokens=max_new_tokens, **cfg)
    return answer(model, processor, [prompt], [pngs], config=config)[0]


def test_health_models_and_page(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text


def test_completion_matches_direct_answer(client, tiny):
    body = {"messages": [user("What is this?", data_url(PNGS[0]))], "max_tokens": 10}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    out = resp.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == expected_answer(tiny, "What is this?", PNGS[:1], 10)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] <= 10 and out["usage"]["prompt_tokens"] > 10


def _sse_events(text: str) -> list:
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_chunks_concatenate_to_answer(client, tiny):
    body = {"messages": [user("Describe it.", data_url(PNGS[1]))], "max_tokens": 12, "stream": True}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) > 1
    assert text.strip() == expected_answer(tiny, "Describe it.", PNGS[1:2], 12)


def test_stop_and_seed(client, tiny):
    full = expected_answer(tiny, "What is this?", PNGS[:1], 16)
    stop = next(full[i : i + 2] for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    body = {"messages": [user("What is this?", data_url(PNGS[0]))], "max_tokens": 16, "stop": stop}
    out = client.post("/v1/chat/completions", json=body).json()
    content = out["choices"][0]["message"]["content"]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert content == full[: full.index(stop)].strip()

    sampled = {"messages": [user("What is this?", data_url(PNGS[0]))], "max_tokens": 12, "temperature": 1.5}
    a = client.post("/v1/chat/completions", json={**sampled, "seed": 7}).json()["choices"][0]["message"][
        "content"
    ]
    b = client.post("/v1/chat/completions", json={**sampled, "seed": 7}).json()["choices"][0]["message"][
        "content"
    ]
    assert a == b
    assert a == expected_answer(tiny, "What is this?", PNGS[:1], 12, do_sample=True, temperature=1.5, seed=7)


def test_multi_turn_and_system_messages(client, tiny):
    model, processor = tiny
    messages = [
        {"role": "system", "content": "Be brief."},
        user("What is this?", data_url(PNGS[0])),
        {"role": "assistant", "content": "A red thing."},
        {"role": "user", "content": "Are you sure?"},
    ]
    out = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8})
    assert out.status_code == 200
    assert out.json()["usage"]["prompt_tokens"] > 20


def _image_part(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


BAD_REQUESTS = {
    "empty messages": ({"messages": []}, 400, "messages"),
    "no messages": ({"max_tokens": 3}, 400, "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    "unknown part": (
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        400,
        "messages[0].content[0]",
    ),
    "missing url": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content[0].image_url.url",
    ),
    "bad base64": (
        _image_part("data:image/png;base64,%%%not-base64%%%"),
        400,
        "messages[0].content[0].image_url",
    ),
    "not an image": (
        _image_part("data:image/png;base64," + base64.b64encode(b"this is plain text").decode()),
        400,
        "messages[0].content[0].image_url",
    ),
    "oversize image": (_image_part(data_url(make_png(80, 80))), 400, "messages[0].content[0].image_url"),
    "file url": (_image_part("file:///etc/passwd"), 400, "messages[0].content[0].image_url"),
    "http url": (_image_part("http://127.0.0.1:9/cat.png"), 400, "messages[0].content[0].image_url"),
    "https url": (_image_part("https://example.com/cat.png"), 400, "messages[0].content[0].image_url"),
    "ftp url": (_image_part("ftp://example.com/cat.png"), 400, "messages[0].content[0].image_url"),
    "too many images": (
        {"messages": [user("three", *[data_url(PNGS[0])] * 3)]},
        400,
        "messages",
    ),
    "max_tokens too large": ({"messages": [user("hi")], "max_tokens": 10_000}, 400, "max_tokens"),
    "max_tokens zero": ({"messages": [user("hi")], "max_tokens": 0}, 400, "max_tokens"),
    "negative temperature": ({"messages": [user("hi")], "temperature": -0.5}, 400, "temperature"),
    "top_p zero": ({"messages": [user("hi")], "top_p": 0}, 400, "top_p"),
    "n > 1": ({"messages": [user("hi")], "n": 2}, 400, "n"),
    "too many stops": ({"messages": [user("hi")], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "assistant last": ({"messages": [user("hi"), {"role": "assistant", "content": "x"}]}, 400, "messages"),
    "roles out of order": ({"messages": [user("hi"), user("again")]}, 400, "messages"),
    "placeholder in text": (
        {"messages": [{"role": "user", "content": "<image> hi"}]},
        400,
        "messages[0].content",
    ),
    "body too large": ({"messages": [user("x" * 300_000)]}, 413, "body"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_clean_4xx(client, name):
    body, status, param = BAD_REQUESTS[name]
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b"\xff\xfe\x00garbage", b""], ids=["syntax", "array", "binary", "empty"]
)
def test_malformed_bodies(client, raw):
    resp = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "body"


def test_remote_images_need_the_flag_and_file_urls_a_second_one(tiny, tmp_path):
    model, processor = tiny
    image = tmp_path / "img.png"
    image.write_bytes(PNGS[0])
    remote_only = create_app(model, processor, ServerSettings(limits=ServerLimits(allow_remote_images=True)))
    with TestClient(remote_only) as c:
        resp = c.post("/v1/chat/completions", json={"messages": [user("hi", image.as_uri())]})
        assert resp.status_code == 400 and "file:" in resp.json()["error"]["message"]
        # The flag lets the server try to fetch: an unreachable host is still a clean 4xx.
        resp = c.post("/v1/chat/completions", json={"messages": [user("hi", "http://127.0.0.1:9/x.png")]})
        assert resp.status_code == 400 and "fetch" in resp.json()["error"]["message"]
    limits = ServerLimits(allow_file_images=True, max_output_tokens=8, default_max_tokens=8)
    with TestClient(create_app(model, processor, ServerSettings(limits=limits))) as c:
        resp = c.post("/v1/chat/completions", json={"messages": [user("What is this?", image.as_uri())]})
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"] == expected_answer(
            tiny, "What is this?", PNGS[:1], 8
        )


@pytest.mark.parametrize("scheduler", ["continuous", "dynamic"])
def test_32_concurrent_requests_are_batched_and_correct(tiny, scheduler):
    model, processor = tiny
    settings = ServerSettings(model_name="tiny", max_batch_size=8, batch_wait_ms=20, scheduler=scheduler)
    app = create_app(model, processor, settings)
    server = start_background_server(app)
    try:
        jobs = []
        for i in range(32):
            png = PNGS[i % 3]
            q = QUESTIONS[i % 4]
            jobs.append((q, png, 6 + i % 5, i % 2 == 0))

        def call(job):
            q, png, max_tokens, stream = job
            body = {"messages": [user(q, data_url(png))], "max_tokens": max_tokens, "stream": stream}
            with httpx.Client(base_url=server.url, timeout=120) as http:
                resp = http.post("/v1/chat/completions", json=body)
            if resp.status_code != 200:
                return resp.status_code, resp.text
            if stream:
                events = _sse_events(resp.text)
                assert events[-1] == "[DONE]"
                text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
                return 200, text.strip()
            return 200, resp.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, jobs))
        assert [status for status, _ in results] == [200] * 32, results
        cache: dict = {}
        for (q, png, max_tokens, _), (_, text) in zip(jobs, results, strict=True):
            key = (q, png, max_tokens)
            if key not in cache:
                cache[key] = expected_answer(tiny, q, [png], max_tokens)
            assert text == cache[key]
        batcher = app.state.batcher
        assert max(batcher.batch_sizes) > 1, "concurrent requests should share batches"
        if scheduler == "dynamic":  # one entry per batch
            assert sum(batcher.batch_sizes) == 32
        else:  # one entry per decoding step; every request but its first token decodes in steps
            assert max(batcher.batch_sizes) <= 8
            assert sum(batcher.batch_sizes) <= sum(job[2] for job in jobs)
    finally:
        server.stop()
