"""Dynamic batching: one worker thread owns the model and runs waiting requests together.

Requests arriving within `max_wait_ms` of each other (up to `max_batch_size`) go through
`iter_generate` as one left-padded batch; every request gets its own event stream of text deltas.
Rows of a batch generate exactly what they generate alone, so batching changes throughput, never
answers. Requests are batched only with requests whose sampling settings match: all greedy requests
share a batch, unseeded sampled requests share one when temperature/top-p/top-k/penalty agree, and a
seeded sampled request runs alone so its seed gives the same tokens every time.

A request's `GenerationConfig.stop_strings` are its own stop sequences (OpenAI's `stop`): the text
ends right before the first one. The chat template's stop strings and the EOS ids come from the
model and processor (`eos_token_ids`), the same rule `generate` and `answer` follow. Text is
detokenised incrementally (`TextDeltas`), so the work per token does not grow with the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..generate import stopping
from ..generate.core import GenerationResult, iter_generate
from ..generate.sampling import GenerationConfig
from ..generate.text import TextDeltas

if TYPE_CHECKING:
    from ..model.eve import EveForCausalLM

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The server has more waiting requests than it accepts."""


def batch_key(config: GenerationConfig, unique: int, ignore_eos: bool = False) -> tuple:
    """Requests with equal keys can share a batch (`unique` keeps a seeded request alone)."""
    if not config.do_sample:
        return ("greedy", config.repetition_penalty, ignore_eos)
    if config.seed is not None:
        return ("seeded", unique)
    return ("sample", config.temperature, config.top_p, config.top_k, config.repetition_penalty, ignore_eos)


@dataclass
class Event:
    kind: str  # "delta", "done", "error", or "cancelled" (the server's own side hung up)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 500  # the HTTP status of an "error" event


@dataclass
class GenRequest:
    input_ids: list[int]  # one prompt, IMAGE_TOKEN_INDEX at each image
    images: list[Tensor]  # processed pixels in placeholder order
    config: GenerationConfig  # stop_strings: this request's own stop sequences
    prompt_tokens: int = 0  # with images expanded (for usage reporting)
    ignore_eos: bool = False  # neither EOS nor the template's stop strings end it (benchmarks)


class Ticket:
    """A submitted request: its event stream (async or blocking) and a cancel switch."""

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request = request
        self.loop = loop
        self.cancelled = False
        self.enqueued = time.perf_counter()
        self._async_q: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self._sync_q: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def push(self, event: Event) -> None:
        if self._async_q is not None and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._async_q.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancelled = True
        else:
            self._sync_q.put(event)

    def cancel(self) -> None:
        """Stop the request: the worker drops its row at its next step, and a reader still waiting
        on `events()` wakes up (the worker sends a cancelled row nothing more)."""
        if not self.cancelled:
            self.cancelled = True
            self.push(Event("cancelled"))

    def expired(self, timeout_s: float | None) -> bool:
        """True once the request has been in the server (queued or running) longer than `timeout_s`."""
        return timeout_s is not None and time.perf_counter() - self.enqueued > timeout_s

    async def events(self) -> AsyncIterator[Event]:
        assert self._async_q is not None, "submit from a running event loop to use events()"
        while True:
            event = await self._async_q.get()
            yield event
            if event.kind != "delta":
                return

    def iter_events(self, timeout: float | None = None) -> Iterator[Event]:
        while True:
            event = self._sync_q.get(timeout=timeout)
            yield event
            if event.kind != "delta":
                return

    def result(self, timeout: float | None = None) -> tuple[str, Event]:
        """Blocking: the whole text and the final event."""
        pieces, last = [], Event("error", "no events")
        for event in self.iter_events(timeout):
            if event.kind == "delta":
                pieces.append(event.text)
            last = event
        return "".join(pieces), last


@dataclass
class _Row:
    """Per-request decoding state inside a running batch."""

    ticket: Ticket
    deltas: TextDeltas  # one row; cuts the text at the request's stop sequences
    started: bool = False
    done: bool = False


class ModelWorker:
    """A request queue served by one thread that owns the model: the lifecycle and the admission
    rules both schedulers share. Subclasses implement `_run` and decide what to queue."""

    thread_name = "eve-worker"

    def __init__(
        self,
        model: EveForCausalLM,
        processor: Any,
        *,
        max_batch_size: int,
        max_queue: int,
        eos_token_ids: list[int] | None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.eos_token_ids = (
            eos_token_ids if eos_token_ids is not None else stopping.eos_token_ids(model.config, processor)
        )
        self.template_stops = list(getattr(processor, "stop_strings", []) or [])
        self.pad_id = int(processor.pad_token_id)
        self._waiting: deque[Any] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    def _run(self) -> None:
        raise NotImplementedError

    def _enqueue(self, request: GenRequest, entry: Callable[[Ticket], Any] = lambda ticket: ticket) -> Ticket:
        """A ticket for `request`, queued as `entry(ticket)`; events arrive on an asyncio queue when
        called inside a running loop. A full queue raises QueueFullError."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        ticket = Ticket(request, loop)
        self.start()
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})"
                )
            self._waiting.append(entry(ticket))
            self._cond.notify_all()
        return ticket


class Batcher(ModelWorker):
    """Owns the model in one worker thread; `submit` from any thread or coroutine."""

    thread_name = "eve-batcher"

    def __init__(
        self,
        model: EveForCausalLM,
        processor: Any,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        request_timeout_s: float | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        super().__init__(
            model, processor, max_batch_size=max_batch_size, max_queue=max_queue, eos_token_ids=eos_token_ids
        )
        self.max_wait = max_wait_ms / 1000
        self.request_timeout_s = request_timeout_s
        self._ids = itertools.count()
        self.batches_run = 0
        self.batch_sizes: list[int] = []
        self.cancelled_rows = 0  # rows dropped mid-batch because their client went away

    def submit(self, request: GenRequest) -> Ticket:
        """Queue a request, grouped with others it can share a batch with."""
        key = batch_key(request.config, next(self._ids), request.ignore_eos)
        return self._enqueue(request, lambda ticket: (key, ticket))

    # ------------------------------------------------------------------ worker
    def _take_batch(self) -> list[Ticket] | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            # Give concurrent requests a moment to arrive, unless a full batch is already waiting.
            deadline = time.perf_counter() + self.max_wait
            while len(self._waiting) < self.max_batch_size and not self._stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            key = self._waiting[0][0]
            batch: list[Ticket] = []
            rest: deque[tuple[tuple, Ticket]] = deque()
            while self._waiting:
                k, ticket = self._waiting.popleft()
                if k == key and len(batch) < self.max_batch_size:
                    if ticket.expired(self.request_timeout_s) and not ticket.cancelled:
                        ticket.push(self._timeout_event())
                    elif not ticket.cancelled:
                        batch.append(ticket)
                else:
                    rest.append((k, ticket))
            self._waiting = rest
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                break
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception as exc:  # one bad batch must not kill the server
                logger.exception("generation failed for a batch of %d", len(batch))
                for ticket in batch:
                    ticket.push(Event("error", f"generation failed: {type(exc).__name__}: {exc}"))
        with self._cond:  # fail whatever is still waiting
            for _, ticket in self._waiting:
                ticket.push(Event("error", "server is shutting down"))
            self._waiting.clear()

    def _collate(self, batch: list[Ticket]) -> tuple[Tensor, Tensor, list[Tensor]]:
        rows = [t.request.input_ids for t in batch]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's next token lands in the last column
            ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row) :] = 1
        dev, dtype = self.model.device, self.model.dtype
        images = [img.to(dev, dtype) for t in batch for img in t.request.images]
        return ids, mask, images

    def _run_batch(self, batch: list[Ticket]) -> None:
        first = batch[0].request.config
        free_run = batch[0].request.ignore_eos  # the batch key puts only such requests together
        template_stops = [] if free_run else self.template_stops
        cfg = dataclasses.replace(
            first,
            max_new_tokens=max(t.request.config.max_new_tokens for t in batch),
            eos_token_id=[] if free_run else list(self.eos_token_ids),
            stop_strings=list(template_stops),
        )
        ids, mask, images = self._collate(batch)
        rows = [
            _Row(t, TextDeltas(self.tokenizer, 1, template_stops, t.request.config.stop_strings))
            for t in batch
        ]
        self.batches_run += 1
        self.batch_sizes.append(len(batch))
        res = GenerationResult([], [])
        steps = iter_generate(
            self.model, ids, images or None, mask, config=cfg, tokenizer=self.tokenizer, result=res
        )
        for step in steps:
            finished = set(step.finished)
            for i in step.rows:
                row = rows[i]
                if row.done:
                    continue
                if row.ticket.cancelled:
                    row.done = True
                    self.cancelled_rows += 1
                    continue
                if row.ticket.expired(self.request_timeout_s):
                    row.done = True
                    row.ticket.push(self._timeout_event())
                    continue
                seq = res.sequences[i]
                if i in finished:
                    self._finish(row, seq, res.finish_reasons[i])
                elif len(seq) >= row.ticket.request.config.max_new_tokens:
                    self._finish(row, seq, "length")
                else:
                    self._advance(row, seq)
            if all(r.done for r in rows):
                steps.close()  # rows the batch still computes are no longer wanted
                break
        for i, row in enumerate(rows):
            if not row.done:
                self._finish(
                    row, res.sequences[i], res.finish_reasons[i] if i < len(res.finish_reasons) else "length"
                )

    def _timeout_event(self) -> Event:
        return Event("error", f"request timed out after {self.request_timeout_s:g} s", status=504)

    def _emit(self, row: _Row, piece: str) -> None:
        if not row.started:
            piece = piece.lstrip()  # the template leaves the answer's leading space to the model
            row.started = bool(piece)
        if piece:
            row.ticket.push(Event("delta", piece))

    def _advance(self, row: _Row, seq: list[int]) -> None:
        self._emit(row, row.deltas.delta(0, seq))
        if row.deltas.stopped[0]:
            self._done(row, len(seq), "stop")

    def _finish(self, row: _Row, seq: list[int], reason: str) -> None:
        self._emit(row, row.deltas.delta(0, seq, final=True))
        self._done(row, len(seq), "stop" if row.deltas.stopped[0] else reason)

    def _done(self, row: _Row, n_tokens: int, reason: str) -> None:
        row.done = True
        finish = {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)
        row.ticket.push(
            Event(
                "done",
                finish_reason=finish,
                prompt_tokens=row.ticket.request.prompt_tokens,
                completion_tokens=n_tokens,
            )
        )
