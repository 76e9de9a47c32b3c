"""The FastAPI app: OpenAI-compatible chat completions, model list, health, metrics, and the web demo."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from .batcher import Batcher, QueueFullError, Ticket
from .inputs import RequestError, ServerLimits, build_request
from .metrics import ServeMetrics
from .scheduler import ContinuousScheduler
from .schemas import UNSUPPORTED_FIELDS, ChatCompletionRequest

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerSettings:
    model_name: str = "eve"
    limits: ServerLimits = field(default_factory=ServerLimits)
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0  # the dynamic scheduler's gathering window
    max_queue: int = 256
    scheduler: str = "continuous"  # "continuous" (per-step) or "dynamic" (per-batch)
    kv_capacity: int = 2048  # continuous: tokens per KV slot (prompt, images and answer)
    prefill_chunk: int = 512  # continuous: prompts longer than this prefill in chunks
    request_timeout_s: float | None = 600.0
    retry_after_s: int = 1  # the Retry-After of a 503 when the queue is full

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {self.scheduler!r}")


SCHEDULERS = ("continuous", "dynamic")


def make_scheduler(model: Any, processor: Any, settings: ServerSettings) -> Batcher | ContinuousScheduler:
    """The request scheduler `settings.scheduler` names."""
    if settings.scheduler == "dynamic":
        return Batcher(
            model,
            processor,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.batch_wait_ms,
            max_queue=settings.max_queue,
            request_timeout_s=settings.request_timeout_s,
        )
    return ContinuousScheduler(
        model,
        processor,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        kv_capacity=settings.kv_capacity,
        prefill_chunk=settings.prefill_chunk,
        request_timeout_s=settings.request_timeout_s,
    )


def error_response(
    message: str,
    param: str | None = None,
    status: int = 400,
    kind: str | None = None,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": kind,
                "param": param,
                "code": code if code is not None else status,
            }
        },
        status_code=status,
        headers=headers,
    )


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content', 'list[...]', 0, 'text', 'text') -> 'messages[0].content[0].text'."""
    out, last = "", None
    for part in loc:
        if isinstance(part, str) and ("[" in part or part == "str"):
            continue  # the name of a union branch, not a field
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != last:  # a tagged union repeats the tag before the field of the same name
            out += ("." if out else "") + str(part)
        last = part
    return out or "body"


def _validation_error(exc: ValidationError) -> JSONResponse:
    errors = exc.errors()
    # With unions pydantic reports every branch; the deepest location is the most specific one.
    first = (
        max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid request"}
    )
    param = _loc_to_param(tuple(first.get("loc", ())))
    return error_response(f"{param}: {first.get('msg', 'invalid value')}", param)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            f"request body is {declared} bytes; the limit is {limit} (--max-body-mb)", "body", 413
        )
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise RequestError(
                f"request body exceeds the limit of {limit} bytes (--max-body-mb)", "body", 413
            )
    return bytes(body)


def create_app(model: Any, processor: Any, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `model` with the scheduler `settings` names (its thread starts with the app)."""
    settings = settings or ServerSettings()
    batcher = make_scheduler(model, processor, settings)
    metrics = ServeMetrics()
    metrics.queue_depth.set_function(lambda: batcher.queue_size)
    if isinstance(batcher, ContinuousScheduler):
        metrics.running.set_function(lambda: batcher.running)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="eve-vlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.settings = settings
    app.state.metrics = metrics
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "queued": batcher.queue_size}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "eve-vlm"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        try:
            body = await _read_body(request, settings.limits.max_body_bytes)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"request body is not valid JSON: {exc}", "body") from exc
            if not isinstance(payload, dict):
                raise RequestError("request body must be a JSON object", "body")
            for name in UNSUPPORTED_FIELDS:
                if payload.get(name) not in (None, False, [], {}):
                    raise RequestError(f"{name} is not supported by this server", name)
            try:
                req = ChatCompletionRequest.model_validate(payload)
            except ValidationError as exc:
                metrics.requests.labels("invalid").inc()
                return _validation_error(exc)
            if req.model is not None and req.model != settings.model_name:
                metrics.requests.labels("invalid").inc()
                return error_response(
                    f"The model `{req.model}` does not exist; this server serves `{settings.model_name}`",
                    "model",
                    404,
                    code="model_not_found",
                )
            gen = await run_in_threadpool(build_request, req, processor, settings.limits)
            try:
                ticket = batcher.submit(gen)
            except ValueError as exc:  # too long for a KV slot
                raise RequestError(str(exc), "max_tokens") from exc
        except RequestError as exc:
            metrics.requests.labels("invalid").inc()
            return error_response(exc.message, exc.param, exc.status)
        except QueueFullError as exc:
            metrics.requests.labels("rejected").inc()
            return error_response(
                f"server busy: {exc}; retry later",
                None,
                503,
                "server_busy",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        metrics.prompt_tokens.inc(gen.prompt_tokens)
        watch = _Watch(metrics, arrived)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(
                _sse(ticket, completion_id, settings.model_name, watch),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(ticket, completion_id, settings.model_name, watch, request)

    return app


class _Watch:
    """Per-request latency metrics from the events the client receives."""

    def __init__(self, metrics: ServeMetrics, arrived: float) -> None:
        self.metrics, self.arrived, self.last = metrics, arrived, None

    def see(self, event: Any) -> None:
        now = time.perf_counter()
        if event.kind == "delta":
            if self.last is None:
                self.metrics.ttft.observe(now - self.arrived)
            else:
                self.metrics.itl.observe(now - self.last)
            self.last = now
        elif event.kind == "done":
            if self.last is None:
                self.metrics.ttft.observe(now - self.arrived)
            self.metrics.e2e.observe(now - self.arrived)
            self.metrics.generation_tokens.inc(event.completion_tokens)
            self.metrics.requests.labels("finished").inc()
        elif event.kind == "error":
            self.metrics.requests.labels("timeout" if event.status == 504 else "error").inc()

    def cancelled(self) -> None:
        self.metrics.requests.labels("cancelled").inc()


async def _cancel_on_disconnect(request: Request, ticket: Ticket) -> None:
    """A non-streaming client that goes away frees its row at the next step."""
    while not ticket.cancelled:
        if await request.is_disconnected():
            ticket.cancel()
            return
        await asyncio.sleep(0.25)


async def _complete(
    ticket: Ticket, completion_id: str, model_name: str, watch: _Watch, request: Request
) -> JSONResponse:
    pieces: list[str] = []
    final = None
    guard = asyncio.create_task(_cancel_on_disconnect(request, ticket))
    try:
        async for event in ticket.events():
            watch.see(event)
            if event.kind == "delta":
                pieces.append(event.text)
            elif event.kind == "error":
                return error_response(event.text, None, event.status)
            elif event.kind == "done":
                final = event
    finally:
        guard.cancel()
        if ticket.cancelled and final is None:
            watch.cancelled()
        ticket.cancel()  # no-op when done; stops the row if the client went away
    if final is None:  # the client went away (nginx's 499); nobody reads this answer
        return error_response("client closed the request", None, 499)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces).strip()},
                    "finish_reason": final.finish_reason,
                }
            ],
            "usage": _usage(final),
        }
    )


def _usage(event: Any) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


async def _sse(ticket: Ticket, completion_id: str, model_name: str, watch: _Watch) -> AsyncIterator[str]:
    """OpenAI `chat.completion.chunk` events, then `data: [DONE]`."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    ended = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in ticket.events():
            watch.see(event)
            if event.kind == "delta":
                yield chunk({"content": event.text})
            elif event.kind == "error":
                ended = True
                err = {
                    "error": {
                        "message": event.text,
                        "type": "server_error",
                        "param": None,
                        "code": event.status,
                    }
                }
                yield f"data: {json.dumps(err)}\n\n"
            else:
                ended = True
                yield chunk({}, event.finish_reason, usage=_usage(event))
        yield "data: [DONE]\n\n"
    finally:
        if not ended:
            watch.cancelled()
        ticket.cancel()
