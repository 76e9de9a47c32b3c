"""Continuous (iteration-level) batching: rows join and leave the running batch at every step.

One worker thread owns the model. Each iteration it
1. drops rows whose client went away or whose deadline passed (their slot is free at once);
2. admits waiting requests into free slots of the KV pool (`SlotKVCache`);
3. prefills joiners: short prompts together as one left-padded batch (images of any size, as the
   model takes them), a long prompt alone in chunks of about `prefill_chunk` tokens, one chunk per
   iteration, so the running rows keep decoding between chunks;
4. runs one decoding step for every running row.

A row's prefill and decoding use its own RoPE positions and key mask, and its tokens are chosen
from its own logits with its own settings (a seeded request has its own generator), so the greedy
output of a request does not depend on what else runs with it. Requests with different sampling
settings share steps, unlike the dynamic batcher.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..constants import IMAGE_TOKEN_INDEX
from ..generate.sampling import select_next
from ..generate.text import TextDeltas
from .batcher import Event, GenRequest, ModelWorker, Ticket
from .kv_pool import SlotKVCache

if TYPE_CHECKING:
    from ..model.decoder import KVCache
    from ..model.eve import EveForCausalLM

logger = logging.getLogger(__name__)


@dataclass
class _Live:
    """A request inside the scheduler: prefilling or decoding."""

    ticket: Ticket
    deltas: TextDeltas
    seq: list[int] = field(default_factory=list)
    last: int = 0  # the token the next decoding step feeds
    generator: torch.Generator | None = None
    seen: Tensor | None = None  # [1, V] bool, only with a repetition penalty
    started: bool = False
    # chunked prefill state
    cache: KVCache | None = None
    done_ids: int = 0
    done_images: int = 0


class ContinuousScheduler(ModelWorker):
    """Same interface as `Batcher` (`submit`, `start`, `stop`, `queue_size`), scheduling per step."""

    thread_name = "eve-scheduler"

    def __init__(
        self,
        model: EveForCausalLM,
        processor: Any,
        *,
        max_batch_size: int = 8,
        max_queue: int = 256,
        kv_capacity: int = 2048,
        prefill_chunk: int = 512,
        request_timeout_s: float | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        super().__init__(
            model, processor, max_batch_size=max_batch_size, max_queue=max_queue, eos_token_ids=eos_token_ids
        )
        self.kv_capacity = kv_capacity
        self.prefill_chunk = prefill_chunk
        self.request_timeout_s = request_timeout_s
        self.eos = set(self.eos_token_ids)
        self.pool = SlotKVCache(max_batch_size, kv_capacity)
        self._admitted: deque[_Live] = deque()  # slots reserved, prefill not started
        self._chunking: _Live | None = None  # a long prompt being prefilled chunk by chunk
        self._live: list[_Live] = []  # index == pool slot
        self.steps_run = 0
        self.batch_sizes: list[int] = []  # running rows at each decoding step
        self.cancelled_rows = 0

    @property
    def running(self) -> int:
        return len(self._live)

    def submit(self, request: GenRequest) -> Ticket:
        """Queue a request; events arrive on an asyncio queue when called inside a running loop."""
        need = request.prompt_tokens + request.config.max_new_tokens + 1
        if request.prompt_tokens and need > self.kv_capacity:
            raise ValueError(
                f"prompt ({request.prompt_tokens} tokens) plus max_tokens ({request.config.max_new_tokens}) "
                f"exceeds the server's --kv-capacity of {self.kv_capacity} tokens per request"
            )
        return self._enqueue(request)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._admitted or self._chunking or self._live or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                self._admit()
            try:
                self._iteration()
            except Exception as exc:  # one bad step must not kill the server: fail what ran in it
                logger.exception("continuous batching step failed")
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
        self._fail_all("server is shutting down")
        with self._cond:
            for ticket in self._waiting:
                ticket.push(Event("error", "server is shutting down", status=503))
            self._waiting.clear()

    def _admit(self) -> None:
        busy = len(self._live) + len(self._admitted) + (self._chunking is not None)
        while self._waiting and busy < self.max_batch_size:
            ticket = self._waiting.popleft()
            if ticket.cancelled:
                self.cancelled_rows += 1
                continue
            cfg = ticket.request.config
            template_stops = [] if ticket.request.ignore_eos else self.template_stops
            row = _Live(ticket, TextDeltas(self.tokenizer, 1, template_stops, cfg.stop_strings))
            if cfg.do_sample and cfg.seed is not None:
                row.generator = torch.Generator(device=self.model.device).manual_seed(cfg.seed)
            self._admitted.append(row)
            busy += 1

    def _iteration(self) -> None:
        self._drop_gone()
        self._prefill_some()
        if self._live:
            self._decode_step()

    def _expired(self, row: _Live) -> bool:
        return row.ticket.expired(self.request_timeout_s)

    def _drop_gone(self) -> None:
        """Free the slots of rows whose client disconnected or whose time ran out."""
        for slot in range(len(self._live) - 1, -1, -1):
            row = self._live[slot]
            if row.ticket.cancelled:
                self.cancelled_rows += 1
                self._leave(slot)
            elif self._expired(row):
                row.ticket.push(
                    Event("error", f"request timed out after {self.request_timeout_s:g} s", status=504)
                )
                self._leave(slot)
        for rows in (self._admitted,):
            for row in list(rows):
                if row.ticket.cancelled or self._expired(row):
                    rows.remove(row)
                    if not row.ticket.cancelled:
                        row.ticket.push(Event("error", "request timed out before it started", status=504))
        if self._chunking is not None and (self._chunking.ticket.cancelled or self._expired(self._chunking)):
            if not self._chunking.ticket.cancelled:
                self._chunking.ticket.push(Event("error", "request timed out during prefill", status=504))
            self._chunking = None

    def _leave(self, slot: int) -> None:
        moved = self.pool.remove_row(slot)
        if moved is not None:
            self._live[slot] = self._live[moved]
        self._live.pop()

    def _fail_all(self, message: str) -> None:
        rows = [*self._live, *self._admitted, *([self._chunking] if self._chunking else [])]
        for row in rows:
            row.ticket.push(Event("error", message))
        while self._live:
            self._leave(len(self._live) - 1)
        self._admitted.clear()
        self._chunking = None

    # ------------------------------------------------------------------ prefill
    def _prefill_some(self) -> None:
        if (
            self._chunking is None
            and self._admitted
            and self._admitted[0].ticket.request.prompt_tokens > self.prefill_chunk
        ):
            self._chunking = self._admitted.popleft()
        batch: list[_Live] = []
        budget = self.prefill_chunk
        while self._admitted:
            nxt = self._admitted[0]
            cost = max(nxt.ticket.request.prompt_tokens, len(nxt.ticket.request.input_ids))
            if cost > self.prefill_chunk or (batch and cost > budget):
                break
            batch.append(self._admitted.popleft())
            budget -= cost
        if batch:
            self._prefill_batch(batch)
        if self._chunking is not None:
            self._prefill_chunk(self._chunking)

    def _prefill_batch(self, batch: list[_Live]) -> None:
        rows = [r.ticket.request.input_ids for r in batch]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row) :] = 1
        dev, dtype = self.model.device, self.model.dtype
        images = [img.to(dev, dtype) for r in batch for img in r.ticket.request.images]
        with torch.inference_mode():
            out = self.model(
                ids.to(dev),
                images=images or None,
                attention_mask=mask.to(dev),
                use_cache=True,
                padding_side="left",
                logits_to_keep=1,
            )
        self._start_rows(batch, out.logits[:, -1], out.past_key_values)

    def _prefill_chunk(self, row: _Live) -> None:
        """One chunk of a long prompt: about `prefill_chunk` tokens, an image counted by its tokens."""
        req = row.ticket.request
        ids, start, img = req.input_ids, row.done_ids, row.done_images
        end, cost, n_img = start, 0, 0
        while end < len(ids) and (cost == 0 or cost < self.prefill_chunk):
            if ids[end] == IMAGE_TOKEN_INDEX:
                cost += int(self.processor.num_image_tokens(req.images[img + n_img]))
                n_img += 1
            else:
                cost += 1
            end += 1
        dev, dtype = self.model.device, self.model.dtype
        images = [t.to(dev, dtype) for t in req.images[img : img + n_img]]
        chunk = torch.tensor([ids[start:end]], dtype=torch.long, device=dev)
        with torch.inference_mode():
            out = self.model(
                chunk,
                images=images or None,
                attention_mask=torch.ones_like(chunk),
                past_key_values=row.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        row.cache, row.done_ids, row.done_images = out.past_key_values, end, img + n_img
        if end == len(ids):
            self._chunking = None
            self._start_rows([row], out.logits[:, -1], row.cache)
            row.cache = None

    def _start_rows(self, batch: list[_Live], logits: Tensor, cache: KVCache) -> None:
        """First tokens of freshly prefilled rows; rows that go on join the pool."""
        for r in batch:
            if r.ticket.request.config.repetition_penalty != 1.0:
                prompt = torch.tensor([t for t in r.ticket.request.input_ids if t >= 0], device=logits.device)
                r.seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
                r.seen[0, prompt] = True
        tokens = self._select(batch, logits)
        for i, (row, token) in enumerate(zip(batch, tokens, strict=True)):
            if row.ticket.cancelled:
                self.cancelled_rows += 1
                continue
            if self._take(row, token):
                continue
            self.pool.add_row(cache, i)
            self._live.append(row)

    # ------------------------------------------------------------------ decoding
    def _decode_step(self) -> None:
        self.pool.reserve(1)
        dev = self.model.device
        step_ids = torch.tensor([[r.last] for r in self._live], dtype=torch.long, device=dev)
        with torch.inference_mode():
            out = self.model(
                step_ids, attention_mask=torch.ones_like(step_ids), past_key_values=self.pool, use_cache=True
            )
        self.steps_run += 1
        self.batch_sizes.append(len(self._live))
        tokens = self._select(self._live, out.logits[:, -1])
        finished = [
            slot
            for slot, (row, token) in enumerate(zip(self._live, tokens, strict=True))
            if self._take(row, token)
        ]
        for slot in reversed(finished):
            self._leave(slot)

    def _select(self, rows: list[_Live], logits: Tensor) -> list[int]:
        """Each row's next token from its own logits and settings; greedy rows in one argmax."""
        tokens = logits.float().argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            cfg = row.ticket.request.config
            if cfg.do_sample or cfg.repetition_penalty != 1.0:
                tokens[i] = int(select_next(logits[i : i + 1], row.seen, cfg, row.generator)[0])
            if row.seen is not None:
                row.seen[0, tokens[i]] = True
        return tokens

    def _take(self, row: _Live, token: int) -> bool:
        """Record a row's new token and stream its text; True when the row is finished."""
        cfg = row.ticket.request.config
        if token in self.eos and not row.ticket.request.ignore_eos:
            self._finish(row, "stop")
            return True
        row.seq.append(token)
        row.last = token
        piece = row.deltas.delta(0, row.seq, final=len(row.seq) >= cfg.max_new_tokens)
        self._emit(row, piece)
        if row.deltas.stopped[0]:
            self._finish(row, "stop", flush=False)
            return True
        if len(row.seq) >= cfg.max_new_tokens:
            self._finish(row, "length", flush=False)
            return True
        return False

    def _emit(self, row: _Live, piece: str) -> None:
        if not row.started:
            piece = piece.lstrip()  # the template leaves the answer's leading space to the model
            row.started = bool(piece)
        if piece:
            row.ticket.push(Event("delta", piece))

    def _finish(self, row: _Live, reason: str, flush: bool = True) -> None:
        if flush:
            self._emit(row, row.deltas.delta(0, row.seq, final=True))
            if row.deltas.stopped[0]:
                reason = "stop"
        row.ticket.push(
            Event(
                "done",
                finish_reason=reason,
                prompt_tokens=row.ticket.request.prompt_tokens,
                completion_tokens=len(row.seq),
            )
        )
