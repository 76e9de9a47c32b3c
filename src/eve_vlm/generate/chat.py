"""Multi-turn chat that keeps the KV cache of earlier turns.

Each turn the whole conversation is tokenised again (cheap), compared with the token ids whose keys
are already in the cache, and only the ids after the longest common prefix go through the model.
Images and history are therefore encoded once, and because the ids fed are exactly the ids of the
full conversation, the answer equals what re-encoding the whole conversation gives. Where the
tokeniser would split an earlier answer differently from how it was generated, the prefix simply
ends earlier and a few more tokens are fed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..constants import IMAGE_TOKEN_INDEX
from ..model.decoder import KVCache
from .core import GenerationResult, stream_text
from .prompts import with_image_placeholders
from .sampling import GenerationConfig
from .stopping import resolve_config

if TYPE_CHECKING:
    from ..model.eve import EveForCausalLM

logger = logging.getLogger(__name__)

HELP = "commands: /image FILE (attach an image to your next message), /reset (new conversation), /quit"


@dataclass
class TurnStats:
    """What the last turn cost: tokens in the full prompt (images expanded), reused from cache, fed."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    fed_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = ""


def truncate_cache(cache: KVCache, length: int) -> None:
    """Forget every cached key after the first `length` (batch-of-1 cache without padding)."""
    if length > cache.length:
        raise ValueError(f"cannot truncate a cache of length {cache.length} to {length}")
    cache.length = length
    if cache.valid is not None:
        cache.valid = cache.valid[:, :length]
        cache.next_position = cache.valid.long().sum(1)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """A conversation with one model; `send(text)` streams the answer and remembers the turn."""

    def __init__(
        self,
        model: EveForCausalLM,
        processor: Any,
        config: GenerationConfig | None = None,
        *,
        system: str | None = None,
        reuse_cache: bool = True,
    ) -> None:
        self.model = model
        self.processor = processor
        self.config = config or GenerationConfig(max_new_tokens=256)
        self.system = system
        self.reuse_cache = reuse_cache
        self.last_stats = TurnStats()
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (drops history, images and the cache)."""
        self.messages: list[dict[str, str]] = (
            [] if self.system is None else [{"role": "system", "content": self.system}]
        )
        self.images: list[Tensor] = []  # processed pixels, in placeholder order
        self.pending_images: list[Tensor] = []  # attached to the next user message
        self._cache: KVCache | None = None
        self._ids: list[int] = []  # ids whose keys are in the cache
        self._spans: list[int] = []  # cache entries per id (an image expands to many)

    def add_image(self, source: Any) -> None:
        """Attach an image (path, bytes, data URL or PIL image) to the next user message."""
        self.pending_images.append(self.processor.image_processor([source])[0])

    # ------------------------------------------------------------------ prompts
    def full_prompt(self) -> tuple[list[int], list[Tensor]]:
        """The whole conversation's ids (generation prompt appended) and its images: the reference
        input that re-encoding would feed."""
        ids = self.processor.encode_prompt(self.messages, num_images=len(self.images))
        return ids, [img.to(self.model.device, self.model.dtype) for img in self.images]

    def _span(self, token: int, image_index: int) -> int:
        if token != IMAGE_TOKEN_INDEX:
            return 1
        return int(self.processor.num_image_tokens(self.images[image_index]))

    def _spans_for(self, ids: list[int]) -> list[int]:
        spans, k = [], 0
        for t in ids:
            spans.append(self._span(t, k))
            k += t == IMAGE_TOKEN_INDEX
        return spans

    # ------------------------------------------------------------------ turns
    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer's text pieces; the turn is kept when done.

        If generation fails or the caller stops iterating early, the turn is rolled back (the
        attached images stay pending for the next message).
        """
        pending, n_images = self.pending_images, len(self.images)
        content = with_image_placeholders(text, len(pending))  # ValueError: more <image> than images
        self.messages.append({"role": "user", "content": content})
        self.images.extend(pending)
        self.pending_images = []
        done = False
        try:
            yield from self._generate_turn()
            done = True
        finally:
            if not done:
                self.messages.pop()
                del self.images[n_images:]
                self.pending_images = pending

    def _generate_turn(self) -> Iterator[str]:
        full, images = self.full_prompt()
        reuse = self._reusable_prefix(full)
        n_img_reused = sum(1 for t in full[:reuse] if t == IMAGE_TOKEN_INDEX)
        cache = self._cache if reuse else None
        if cache is not None:
            truncate_cache(cache, sum(self._spans[:reuse]))
        new_ids = full[reuse:]
        spans = self._spans_for(full)
        self.last_stats = TurnStats(
            prompt_tokens=sum(spans), reused_tokens=sum(spans[:reuse]), fed_tokens=sum(spans[reuse:])
        )
        cfg = resolve_config(
            self.model,
            self.config,
            tokenizer=self.processor.tokenizer,
            stop_strings=getattr(self.processor, "stop_strings", None),
        )
        res = GenerationResult([], [])
        # The cache is rebuilt by this turn; if it fails half way, nothing stale may be reused.
        self._cache, self._ids, self._spans = None, [], []
        pieces: list[str] = []
        for _, piece in stream_text(
            self.model,
            self.processor,
            torch.tensor([new_ids], dtype=torch.long),
            images[n_img_reused:] or None,
            torch.ones(1, len(new_ids), dtype=torch.long),
            config=cfg,
            result=res,
            past_key_values=cache,
        ):
            pieces.append(piece)
            yield piece
        seq = res.sequences[0] if res.sequences else []
        self.last_stats.new_tokens = len(seq)
        self.last_stats.finish_reason = res.finish_reasons[0] if res.finish_reasons else "length"
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
        if self.reuse_cache and res.cache is not None:
            self._keep_cache(res.cache, full + seq, spans + [1] * len(seq))

    def ask(self, text: str) -> str:
        """`send` without streaming: the whole answer (stripped)."""
        return "".join(self.send(text)).strip()

    def _reusable_prefix(self, full: list[int]) -> int:
        if not self.reuse_cache or self._cache is None:
            return 0
        # At least one id must be fed, to get the logits of the next token.
        return min(common_prefix(self._ids, full), len(full) - 1)

    def _keep_cache(self, cache: KVCache, ids: list[int], spans: list[int]) -> None:
        """Record which ids the cache now holds (the last sampled token is never fed; stop-string
        tokens may have been fed and then dropped from the answer)."""
        total, keep = 0, 0
        for span in spans:
            if total + span > cache.length:
                break
            total += span
            keep += 1
        truncate_cache(cache, total)
        self._cache, self._ids, self._spans = cache, ids[:keep], spans[:keep]


def run_repl(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """The terminal loop of `eve chat`: `/image FILE`, `/reset`, `/quit`; answers stream to `write`.

    `read` raises EOFError at the end of input (as `input` does).
    """
    from ..processing.images import ImageError

    while True:
        try:
            line = read(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/help":
            write(HELP + "\n")
            continue
        if line == "/reset":
            session.reset()
            write("(conversation reset)\n")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            if not path:
                write("usage: /image FILE\n")
                continue
            try:
                session.add_image(path)
            except (ImageError, OSError) as exc:
                write(f"error: {exc}\n")
                continue
            write(f"(image {path} attached to your next message)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        try:
            for piece in session.send(line):
                write(piece)
        except ValueError as exc:
            write(f"\nerror: {exc}\n")
            continue
        except KeyboardInterrupt:
            write("\n(interrupted)\n")
            continue
        write("\n")
