"""A request's life through a real HTTP connection: the 504 timeout path, and a client that goes away
(mid-stream or while waiting for a whole answer) freeing its row at the next step."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from eve_vlm.loading import load_for_inference
from eve_vlm.serve import ServerLimits, ServerSettings, create_app
from eve_vlm.serve.server import start_background_server

LONG = 2000  # tokens no test lets a request finish: a freed row stops far sooner


@pytest.fixture(scope="module")
def tiny(tiny_v2_dir):
    return load_for_inference(tiny_v2_dir, device="cpu")


def _serve(tiny, scheduler: str, **settings):
    model, processor = tiny
    limits = ServerLimits(max_output_tokens=LONG, default_max_tokens=16)
    app = create_app(
        model,
        processor,
        ServerSettings(
            model_name="tiny", scheduler=scheduler, limits=limits, kv_capacity=LONG + 256, **settings
        ),
    )
    return app, start_background_server(app)


def _body(max_tokens: int, stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # the answer runs to max_tokens: only a timeout or a disconnect ends it sooner
        "stream": stream,
    }


def _metric(url: str, series: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def _wait_until(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("scheduler", ["continuous", "dynamic"])
def test_a_request_past_its_timeout_gets_504(tiny, scheduler):
    app, server = _serve(tiny, scheduler, request_timeout_s=0.05)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            resp = http.post("/v1/chat/completions", json=_body(LONG, stream=False))
            assert resp.status_code == 504, resp.text
            err = resp.json()["error"]
            assert "timed out" in err["message"] and err["code"] == 504 and err["type"] == "server_error"

            # A stream has sent its 200 headers already: the timeout is an error event, then [DONE].
            resp = http.post("/v1/chat/completions", json=_body(LONG, stream=True))
            assert resp.status_code == 200
            events = [b[len("data: ") :] for b in resp.text.strip().split("\n\n")]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == 504 and "timed out" in error["message"]
        assert _metric(server.url, 'eve:requests_total{status="timeout"}') == 2.0
        assert _metric(server.url, 'eve:requests_total{status="finished"}') == 0.0
        if scheduler == "continuous":
            assert _wait_until(lambda: app.state.batcher.running == 0)
    finally:
        server.stop()


@pytest.mark.parametrize("scheduler", ["continuous", "dynamic"])
def test_a_client_that_disconnects_mid_stream_frees_its_row(tiny, scheduler):
    app, server = _serve(tiny, scheduler)
    sched = app.state.batcher
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=_body(LONG, stream=True)) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    chunk = json.loads(line[6:]) if line.startswith("data: ") else {}
                    if chunk and chunk["choices"][0]["delta"].get("content"):
                        break  # tokens are flowing: hang up mid-stream
        # Leaving the block closed the connection. The server notices, cancels the ticket, and the
        # scheduler drops the row at its next step, long before the answer's LONG tokens.
        assert _wait_until(lambda: sched.cancelled_rows == 1), "the disconnected row was never dropped"
        if scheduler == "continuous":
            assert _wait_until(lambda: sched.running == 0)
            assert sched.steps_run < LONG - 1
            assert sched.pool.rows == 0
        assert _metric(server.url, 'eve:requests_total{status="cancelled"}') == 1.0
        assert _metric(server.url, 'eve:requests_total{status="finished"}') == 0.0
        assert _metric(server.url, "eve:num_requests_running") == 0.0
        # The freed worker serves the next request.
        with httpx.Client(base_url=server.url, timeout=60) as http:
            resp = http.post("/v1/chat/completions", json=_body(4, stream=False))
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_row(tiny):
    """Non-streaming: the app polls for the disconnect while the row decodes."""
    app, server = _serve(tiny, "continuous")
    sched = app.state.batcher
    try:
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.5)) as http:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=_body(LONG, stream=False))
        assert _wait_until(lambda: sched.cancelled_rows == 1), "the disconnected row was never dropped"
        assert _wait_until(lambda: sched.running == 0)
        assert sched.steps_run < LONG - 1
        assert _metric(server.url, 'eve:requests_total{status="cancelled"}') == 1.0
    finally:
        server.stop()
