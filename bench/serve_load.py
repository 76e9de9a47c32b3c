"""Open-loop load benchmark of `eve serve`: the dynamic and the continuous scheduler, one run, one model.

For each scheduler it starts `eve serve` on 127.0.0.1 (a free port, same model, same
--max-batch-size), then sends, over loopback, a bounded number of requests (the run ends by itself):
  1. burst: many requests at once whose answers mix short (8 tokens) and long (128 tokens), all
     streamed: generated tokens/s (acceptance: continuous >= 1.25x dynamic);
  2. short-behind-long: long requests start, then short ones arrive while they decode: p95 time to
     first token of the short ones (acceptance: continuous >= 3x sooner);
  3. Poisson arrivals at several rates: short and long answers, text-only and image requests of
     several sizes, streaming and not: requests/s, generated tokens/s, p50/p95/p99 of TTFT
     (streamed requests) and latency.
Answers run to their `max_tokens` (`ignore_eos`, vLLM's extension), so both schedulers do the same
work. Uses runs/quickstart/final when it exists, else a tiny random model.

    PYTHONPATH=src python bench/serve_load.py [--model DIR] [--max-batch-size 8] [--rates 1,2,4]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "runs" / "quickstart" / "final"
SHORT, LONG = 8, 128


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="model folder (default: the quickstart model, else a tiny one)"
    )
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--burst", type=int, default=24, help="requests sent at once in part 1")
    p.add_argument(
        "--rates", default=None, help="Poisson rates in requests/s (default: from part 1's throughput)"
    )
    p.add_argument("--per-rate", type=int, default=24, help="requests per Poisson rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedulers", default="dynamic,continuous")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each server")
    return p.parse_args()


@dataclass
class Result:
    ok: bool
    status: int
    stream: bool
    ttft: float | None
    latency: float
    tokens: int
    kind: str
    want: int = 0  # the request's max_tokens, which `ignore_eos` makes it generate


def png(width: int, height: int, seed: int) -> str:
    from eve_vlm.testing import make_png

    return "data:image/png;base64," + base64.b64encode(make_png(width, height, (200, 40, 40), seed)).decode()


IMAGES = [png(64, 64, 0), png(128, 96, 1), png(200, 200, 2)]


def body(kind: str, image: str | None, stream: bool, model: str) -> dict:
    tokens = SHORT if kind == "short" else LONG
    text = "What colour is the shape?" if kind == "short" else "Describe the image in detail."
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


def call(url: str, payload: dict, kind: str) -> Result:
    result = _call(url, payload, kind)
    result.want = payload["max_tokens"]
    return result


def _call(url: str, payload: dict, kind: str) -> Result:
    start = time.perf_counter()
    stream = payload["stream"]
    ttft, tokens = None, 0
    with httpx.Client(base_url=url, timeout=600) as http:
        if not stream:
            resp = http.post("/v1/chat/completions", json=payload)
            latency = time.perf_counter() - start
            if resp.status_code != 200:
                return Result(False, resp.status_code, False, None, latency, 0, kind)
            return Result(True, 200, False, None, latency, resp.json()["usage"]["completion_tokens"], kind)
        with http.stream("POST", "/v1/chat/completions", json=payload) as resp:
            if resp.status_code != 200:
                resp.read()
                return Result(False, resp.status_code, True, None, time.perf_counter() - start, 0, kind)
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(False, 500, True, ttft, time.perf_counter() - start, tokens, kind)
                delta = event["choices"][0]["delta"] if event.get("choices") else {}
                if ttft is None and delta.get("content"):
                    ttft = time.perf_counter() - start
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    return Result(True, 200, True, ttft, time.perf_counter() - start, tokens, kind)


def run_schedule(url: str, jobs: list[tuple[float, dict, str]]) -> tuple[list[Result], float]:
    """Open loop: each request starts at its own offset, whether or not earlier ones finished."""
    results: list[Result | None] = [None] * len(jobs)
    start = time.perf_counter()

    def worker(i: int, offset: float, payload: dict, kind: str) -> None:
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        results[i] = call(url, payload, kind)

    threads = [threading.Thread(target=worker, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None], time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def summary(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok]
    return {
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "long": sum(r.kind == "long" for r in results),
        "short": sum(r.kind == "short" for r in results),
        "cut": sum(r.tokens != r.want for r in ok),  # answers that did not run to max_tokens
        "req_s": len(ok) / wall,
        "tok_s": sum(r.tokens for r in ok) / wall,
        **{f"ttft_p{q}": pct(ttft, q) for q in (50, 95, 99)},
        **{f"lat_p{q}": pct(lat, q) for q in (50, 95, 99)},
    }


# ---------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, scheduler: str, batch: int, threads: int) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable, "-m", "eve_vlm.cli", "serve", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--scheduler", scheduler, "--max-batch-size", str(batch),
        "--device", "cpu", "--dtype", "float32", "--max-queue", "1024",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a loaded machine loads the model slowly
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"eve serve exited with code {proc.returncode}")
        try:
            models = httpx.get(url + "/v1/models", timeout=2).json()
            return proc, url, models["data"][0]["id"]
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("eve serve did not start within 600 s")


# ---------------------------------------------------------------------- the parts
def burst_jobs(n: int, name: str, rng: random.Random) -> list[tuple[float, dict, str]]:
    kinds = ["long" if i % 2 else "short" for i in range(n)]
    rng.shuffle(kinds)
    return [(0.0, body(k, IMAGES[i % 3] if i % 3 else None, True, name), k) for i, k in enumerate(kinds)]


def short_behind_long_jobs(batch: int, name: str) -> list[tuple[float, dict, str]]:
    longs = [(0.0, body("long", None, True, name), "long") for _ in range(max(1, batch // 2))]
    shorts = [(1.0 + 0.25 * i, body("short", IMAGES[i % 3], True, name), "short") for i in range(batch)]
    return longs + shorts


def poisson_jobs(rate: float, n: int, name: str, rng: random.Random) -> list[tuple[float, dict, str]]:
    """Poisson arrivals whose mix is fixed, not drawn: a third long answers, each image size (and no
    image) in turn, half streamed, each list shuffled on its own. Independent coin flips per request
    can leave a small run with no long answer at all (seed 0 with 8 requests draws 8 short ones)."""

    def mixed(cycle: list, k: int) -> list:
        out = [cycle[i % len(cycle)] for i in range(k)]
        rng.shuffle(out)
        return out

    kinds = mixed(["long", "short", "short"], n)
    images = mixed([None, *IMAGES], n)
    streams = mixed([True, False], n)
    jobs, t = [], 0.0
    for kind, image, stream in zip(kinds, images, streams, strict=True):
        t += rng.expovariate(rate)
        jobs.append((t, body(kind, image, stream, name), kind))
    return jobs


def progress(scheduler: str, load: str, s: dict) -> None:
    print(f"  {scheduler} {load}: {s['ok']} ok, {s['failed']} failed, {s['tok_s']:.1f} tok/s", flush=True)


def main() -> int:
    args = parse_args()
    model = args.model
    tmp = None
    if model is None:
        if QUICKSTART.is_dir():
            model = str(QUICKSTART)
        else:
            from eve_vlm.testing import make_tiny_checkpoint

            tmp = tempfile.TemporaryDirectory()
            model = str(Path(tmp.name) / "tiny")
            make_tiny_checkpoint(model, "v2")
    print(f"model: {model}; --max-batch-size {args.max_batch_size}; answers: {SHORT} and {LONG} tokens")
    schedulers = args.schedulers.split(",")
    table: dict[str, dict[str, dict]] = {s: {} for s in schedulers}
    rates: list[float] | None = [float(r) for r in args.rates.split(",")] if args.rates else None
    # Both servers stay up and take turns part by part, so a shared machine's changing load hits
    # both alike; only one of them works at a time.
    # A SIGTERM (`timeout`) unwinds like Ctrl-C, so the servers below are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: dict[str, tuple[subprocess.Popen, str, str]] = {}
    try:
        for scheduler in schedulers:
            servers[scheduler] = start_server(model, scheduler, args.max_batch_size, args.threads)
        for _, url, name in servers.values():
            call(url, body("short", IMAGES[0], False, name), "warm-up")
        for scheduler, (_, url, name) in servers.items():
            res, wall = run_schedule(url, burst_jobs(args.burst, name, random.Random(args.seed)))
            table[scheduler]["burst"] = summary(res, wall)
            progress(scheduler, "burst", table[scheduler]["burst"])
        for scheduler, (_, url, name) in servers.items():
            res, wall = run_schedule(url, short_behind_long_jobs(args.max_batch_size, name))
            table[scheduler]["short-behind-long"] = summary([r for r in res if r.kind == "short"], wall)
            progress(scheduler, "short-behind-long", table[scheduler]["short-behind-long"])
        if rates is None:  # fractions of what the first scheduler sustains on the burst
            base = table[schedulers[0]]["burst"]["req_s"]
            rates = [round(base * f, 2) for f in (0.5, 1.0, 2.0)]
        for rate in rates:
            for scheduler, (_, url, name) in servers.items():
                res, wall = run_schedule(
                    url, poisson_jobs(rate, args.per_rate, name, random.Random(args.seed))
                )
                table[scheduler][f"poisson {rate:g}/s"] = summary(res, wall)
                progress(scheduler, f"poisson {rate:g}/s", table[scheduler][f"poisson {rate:g}/s"])
        for _, url, _ in servers.values():
            metrics = httpx.get(url + "/metrics", timeout=10).text
            assert "eve:time_to_first_token_seconds_bucket" in metrics, "no TTFT histogram at /metrics"
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    print(
        "\n| scheduler | load | long/short | ok/failed | req/s | gen tok/s | TTFT p50 / p95 / p99 (s) "
        "| latency p50 / p95 / p99 (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for scheduler, rows in table.items():
        for load, s in rows.items():
            print(
                f"| {scheduler} | {load} | {s['long']}/{s['short']} | {s['ok']}/{s['failed']} | {s['req_s']:.2f} | "
                f"{s['tok_s']:.1f} | {s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} / {s['ttft_p99']:.2f} | "
                f"{s['lat_p50']:.2f} / {s['lat_p95']:.2f} / {s['lat_p99']:.2f} |"
            )
    cut = {f"{sch} {load}": s["cut"] for sch, rows in table.items() for load, s in rows.items() if s["cut"]}
    if cut:
        print(f"\nWARNING: answers shorter than their max_tokens (ignore_eos should prevent it): {cut}")
    if {"dynamic", "continuous"} <= set(table):
        d, c = table["dynamic"], table["continuous"]
        print(
            f"\nburst generated tokens/s, continuous / dynamic: {c['burst']['tok_s'] / d['burst']['tok_s']:.2f}x "
            "(target >= 1.25x)"
        )
        print(
            "short-behind-long p95 TTFT, dynamic / continuous: "
            f"{d['short-behind-long']['ttft_p95'] / c['short-behind-long']['ttft_p95']:.2f}x (target >= 3x)"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
