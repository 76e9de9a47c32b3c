"""64 concurrent clients through the official `openai` package: each succeeds or gets the queue's 503,
and the server's memory stays bounded."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from eve_vlm.loading import load_for_inference
from eve_vlm.serve import ServerSettings, create_app
from eve_vlm.serve.server import start_background_server

openai = pytest.importorskip("openai")
logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def rss_bytes() -> int:
    """Resident memory of this process, which runs the server (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
    return psutil.Process().memory_info().rss


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
                    out = client.chat.completions.create(
                        model="tiny", messages=messages, max_tokens=4 + i % 7
                    )
                    text = out.choices[0].message.content or ""
            except openai.APIStatusError as exc:
                assert exc.status_code == 503, exc
                return "503"
            return "ok" if text else "empty"

        def wave() -> list[str]:
            with ThreadPoolExecutor(64) as pool:
                return list(pool.map(call, range(64)))

        start = rss_bytes()
        results = wave()
        after_one = rss_bytes()
        results += wave()
        after_two = rss_bytes()
        logger.info(
            "RSS MiB: %.1f, after 64 clients %.1f, after 128 %.1f",
            start / MIB,
            after_one / MIB,
            after_two / MIB,
        )
        assert set(results) <= {"ok", "503"}, results
        assert results.count("ok") >= 2 * settings.max_queue
        sched = app.state.batcher
        assert sched.running == 0 and sched.queue_size == 0
        assert sched.pool.slots == 8 and sched.pool.rows == 0  # the KV pool never grew
        # Bounded memory: the first wave may warm allocators and thread stacks; the second wave,
        # the same load again, must not add more than a small fraction of it.
        assert after_one - start < 256 * MIB, (start, after_one)
        assert after_two - after_one < 64 * MIB, (after_one, after_two)
        assert client.models.list().data[0].id == "tiny"
    finally:
        server.stop()
