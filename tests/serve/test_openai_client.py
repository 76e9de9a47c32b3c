"""64 concurrent clients through the official `openai` package: each succeeds or gets the queue's 503."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from eve_vlm.loading import load_for_inference
from eve_vlm.serve import ServerSettings, create_app
from eve_vlm.serve.server import start_background_server

openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_64_concurrent_openai_clients(tiny_v2_dir):
    model, processor = load_for_inference(tiny_v2_dir, device="cpu")
    settings = ServerSettings(model_name="tiny", max_batch_size=8, max_queue=24)
    app = create_app(model, processor, settings)
    server = start_background_server(app)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

        def call(i: int) -> str:
            messages = [{"role": "user", "content": f"Question {i}: what is this?"}]
            try:
                if i % 2:
                    stream = client.chat.completions.create(
                        model="tiny", messages=messages, max_tokens=4 + i % 7, stream=True
                    )
                    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                else:
                    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4 + i % 7)
                    text = out.choices[0].message.content or ""
            except openai.APIStatusError as exc:
                assert exc.status_code == 503, exc
                return "503"
            return "ok" if text else "empty"

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(call, range(64)))
        assert set(results) <= {"ok", "503"}, results
        assert results.count("ok") >= settings.max_queue
        sched = app.state.batcher
        assert sched.running == 0 and sched.queue_size == 0
        assert sched.pool.slots == 8 and sched.pool.rows == 0  # the KV pool never grew
        assert client.models.list().data[0].id == "tiny"
    finally:
        server.stop()
