"""Prometheus metrics of the server (`/metrics`), through `prometheus_client`.

Each app gets its own registry, so several servers in one process (tests, the load benchmark)
never share counters. Names follow vLLM's where one exists (`eve:` prefix instead of `vllm:`).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """Counters, gauges and histograms the scheduler and the app update."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "eve:requests", "Finished requests by outcome", ["status"], registry=r
        )  # exposed as eve:requests_total
        self.queue_depth = Gauge("eve:num_requests_waiting", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("eve:num_requests_running", "Rows decoding now", registry=r)
        self.prompt_tokens = Counter(
            "eve:prompt_tokens", "Prompt tokens prefilled (images included)", registry=r
        )
        self.generation_tokens = Counter("eve:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "eve:time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "eve:inter_token_latency_seconds",
            "Time between tokens of one request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "eve:e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
