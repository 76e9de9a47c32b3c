"""Every request limit answers a 4xx whose message names the limit: its value and the flag that sets it."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from eve_vlm.serve import ServerLimits, ServerSettings, create_app
from eve_vlm.testing import make_png

LIMITS = ServerLimits(
    max_body_bytes=50_000,
    max_image_bytes=20_000,
    max_image_pixels=48 * 48,
    max_images=2,
    max_prompt_tokens=300,
    max_output_tokens=64,
    default_max_tokens=8,
)
KV_CAPACITY = 100


def image(width: int, height: int, seed: int = 0) -> dict:
    url = "data:image/png;base64," + base64.b64encode(make_png(width, height, (200, 30, 30), seed)).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts: dict, text: str = "What is this?", **extra) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], **extra}


@pytest.fixture(scope="module")
def client(tiny_v2):
    model, processor = tiny_v2
    settings = ServerSettings(model_name="tiny", limits=LIMITS, kv_capacity=KV_CAPACITY)
    with TestClient(create_app(model, processor, settings)) as c:
        yield c


CASES = {
    "body": (ask(text="x" * 60_000), 413, "body", ["50000", "--max-body-mb"]),
    "images per request": (
        ask(*[image(16, 16)] * 3),
        400,
        "messages",
        ["3 images", "at most 2", "--max-images"],
    ),
    "pixels per image": (
        ask(image(64, 64)),
        400,
        "messages[0].content[0].image_url",
        ["64x64 = 4096 pixels", "--max-image-pixels 2304"],
    ),
    "bytes per image": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 30_000}}
                    ],
                }
            ]
        },
        413,
        "messages[0].content[0].image_url",
        ["larger than 20000 bytes"],
    ),
    "prompt tokens": (ask(text="word " * 400), 400, "messages", ["at most 300", "--max-prompt-tokens"]),
    "max_tokens": (ask(max_tokens=65), 400, "max_tokens", ["max_tokens=65", "64", "--max-output-tokens"]),
    "max_completion_tokens": (
        ask(max_completion_tokens=65),
        400,
        "max_completion_tokens",
        ["max_completion_tokens=65", "--max-output-tokens"],
    ),
    "prompt plus max_tokens per KV slot": (
        ask(image(40, 40), max_tokens=60),
        400,
        "max_tokens",
        ["max_tokens (60)", f"--kv-capacity of {KV_CAPACITY}"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_limit_gives_a_4xx_naming_it(client, name):
    body, status, param, words = CASES[name]
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for word in words:
        assert word in err["message"], (word, err["message"])


def test_requests_within_the_limits_succeed(client):
    resp = client.post("/v1/chat/completions", json=ask(image(40, 40), image(20, 30, 1), max_tokens=8))
    assert resp.status_code == 200, resp.text
