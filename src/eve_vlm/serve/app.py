"""The FastAPI app: OpenAI-compatible chat completions, model list, health, and the web demo."""

from __future__ import annotations

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
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from .batcher import Batcher, QueueFullError, Ticket
from .inputs import RequestError, ServerLimits, build_request
from .schemas import ChatCompletionRequest

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerSettings:
    model_name: str = "eve"
    limits: ServerLimits = field(default_factory=ServerLimits)
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 256


def error_response(
    message: str, param: str | None = None, status: int = 400, kind: str | None = None
) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
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
        raise RequestError(f"request body is {declared} bytes; the limit is {limit}", "body", 413)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise RequestError(f"request body exceeds the limit of {limit} bytes", "body", 413)
    return bytes(body)


def create_app(model: Any, processor: Any, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `model` with dynamic batching (the batcher thread starts with the app)."""
    settings = settings or ServerSettings()
    batcher = Batcher(
        model,
        processor,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.batch_wait_ms,
        max_queue=settings.max_queue,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="eve-vlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.settings = settings
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "queued": batcher.queue_size}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "eve-vlm"}
        return {"object": "list", "data": [card]}

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await _read_body(request, settings.limits.max_body_bytes)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"request body is not valid JSON: {exc}", "body") from exc
            if not isinstance(payload, dict):
                raise RequestError("request body must be a JSON object", "body")
            try:
                req = ChatCompletionRequest.model_validate(payload)
            except ValidationError as exc:
                return _validation_error(exc)
            gen = await run_in_threadpool(build_request, req, processor, settings.limits)
            ticket = batcher.submit(gen)
        except RequestError as exc:
            return error_response(exc.message, exc.param, exc.status)
        except QueueFullError as exc:
            return error_response(str(exc), None, 503, "server_busy")
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(
                _sse(ticket, completion_id, settings.model_name),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(ticket, completion_id, settings.model_name)

    return app


async def _complete(ticket: Ticket, completion_id: str, model_name: str) -> JSONResponse:
    pieces: list[str] = []
    try:
        async for event in ticket.events():
            if event.kind == "delta":
                pieces.append(event.text)
            elif event.kind == "error":
                return error_response(event.text, None, 500)
            else:
                final = event
    finally:
        ticket.cancel()  # no-op when done; stops the row if the client went away
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


async def _sse(ticket: Ticket, completion_id: str, model_name: str) -> AsyncIterator[str]:
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

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in ticket.events():
            if event.kind == "delta":
                yield chunk({"content": event.text})
            elif event.kind == "error":
                err = {"error": {"message": event.text, "type": "server_error", "param": None, "code": 500}}
                yield f"data: {json.dumps(err)}\n\n"
            else:
                yield chunk({}, event.finish_reason, usage=_usage(event))
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()
