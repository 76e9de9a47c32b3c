"""Records -> encoded training examples, skipping (and counting) broken records.

One bad line in a 33M-sample corpus must not stop a run, but a corpus that is mostly broken (wrong
image root, wrong format) must stop it early with a clear message: hence :class:`SkipStats` and
:class:`TooManyBrokenRecords`. Truncation is done here, in *spliced* tokens (text tokens plus the
visual tokens each image expands to), because truncating text before splicing, as the official
collator does, lets the spliced sequence exceed ``model_max_length``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from .order import Split
from .records import Record, RecordSource

logger = logging.getLogger(__name__)

TeacherFn = Callable[[Any], tuple[Tensor, Tensor]]  # PIL image -> (pixels [3,S,S], mask [g,g])

# skip reasons that mean "the record is broken" (they count toward max_broken_fraction); other
# reasons (e.g. nothing supervised left after truncation) are counted but are not data errors
BROKEN_REASONS = frozenset({
    "bad_json", "bad_record", "missing_image", "corrupt_image", "no_assistant_turn",
    "placeholder_mismatch", "bad_conversation", "empty_caption",
})
NO_LABELS_AFTER_TRUNCATION = "no_supervised_tokens_after_truncation"


class TooManyBrokenRecords(RuntimeError):
    """The fraction of broken records exceeded ``max_broken_fraction``: the data is likely wrong."""


class SkipRecord(Exception):
    """Raised by :func:`encode_record` for a record that must be skipped; ``reason`` is its key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SkipStats:
    """Per-reason skip counters of one iterator (one per dataloader worker)."""

    counts: dict[str, int] = field(default_factory=dict)
    total_seen: int = 0

    def seen(self) -> None:
        self.total_seen += 1

    def skip(self, reason: str) -> None:
        self.total_seen += 1
        self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def broken(self) -> int:
        return sum(n for r, n in self.counts.items() if r in BROKEN_REASONS)

    @property
    def fraction(self) -> float:
        """Broken records / records seen (truncation skips excluded)."""
        return self.broken / self.total_seen if self.total_seen else 0.0

    def summary(self) -> str:
        if not self.counts:
            return f"{self.total_seen} records seen, none skipped"
        parts = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return (f"{self.total_seen} records seen, {sum(self.counts.values())} skipped "
                f"({self.fraction:.2%} broken): {parts}")

    def check(self, max_fraction: float, min_records: int) -> None:
        """Raise once at least ``min_records`` were seen and the broken fraction is too high."""
        if self.total_seen >= min_records and self.fraction > max_fraction:
            raise TooManyBrokenRecords(
                f"{self.fraction:.1%} of records are broken (limit {max_fraction:.1%}) after "
                f"{self.total_seen} records: {self.summary()}. Check the manifest format and the "
                "image root, or raise max_broken_fraction.")


@dataclass
class Example:
    """One encoded sample. ``labels`` align with ``input_ids`` (unshifted; the model shifts)."""

    input_ids: Tensor  # long [L], IMAGE_TOKEN_INDEX once per image
    labels: Tensor  # long [L], IGNORE_INDEX where not supervised
    images: list[Tensor]  # [3, H, W] each, in placeholder order
    image_tokens: list[int]  # visual tokens each image expands to
    teacher_pixels: list[Tensor] | None = None
    teacher_masks: list[Tensor] | None = None
    index: int = -1  # the record's position in its split's stream
    id: str = ""
    branch_ids: Tensor | None = None  # long [L]: 0 = shared prefix, k = k-th independent turn

    @property
    def spliced_length(self) -> int:
        return int(self.input_ids.numel()) - len(self.images) + sum(self.image_tokens)

    @property
    def has_image(self) -> bool:
        return len(self.images) > 0

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class DataConfig:
    """Encoding and robustness settings of :class:`EveDataset`."""

    max_length: int = 2048  # in spliced tokens
    max_broken_fraction: float = 0.05
    min_records_for_check: int = 100  # one early bad record must not stop a run
    max_pixels: int | None = None  # passed to load_image (decompression-bomb guard)
    template: str | None = None  # default: the processor's template ("plain" for captions)
    caption_template: str = "plain"
    training_resize: bool | None = None  # v2: True = official training resize; None = config's mode
    # Train each (question, answer) pair of a conversation as its own single-turn sample about the
    # record's image, all in one row sharing the image prefix (no answer leaks between turns).
    independent_turns: bool = False


def truncate(input_ids: Tensor, labels: Tensor, image_tokens: list[int], max_length: int
             ) -> tuple[Tensor, Tensor, int]:
    """Cut to at most ``max_length`` spliced tokens, never inside an image.

    Every token costs 1 except placeholders, which cost their image's visual tokens; the kept
    part is the longest prefix within budget, so an image that does not fit is dropped with
    everything after it. Returns (ids, labels, number of images kept).
    """
    is_img = input_ids == IMAGE_TOKEN_INDEX
    cost = torch.ones_like(input_ids)
    if image_tokens:
        cost[is_img] = torch.tensor(image_tokens, dtype=cost.dtype)
    n = int((cost.cumsum(0) <= max_length).sum())  # cumsum is increasing: the kept set is a prefix
    return input_ids[:n], labels[:n], int(is_img[:n].sum())


def _image_token_count(processor: Any, pixels: Tensor) -> int:
    if hasattr(processor, "num_image_tokens"):
        return int(processor.num_image_tokens(pixels))
    from ..processing.images import num_image_tokens

    ip = processor.image_processor
    return int(num_image_tokens(pixels, getattr(ip, "config", ip)))


def _count_placeholders(record: Record) -> int:
    if record.messages is not None:
        return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in record.messages)
    return 0


def _load_images(record: Record, max_pixels: int | None) -> list[Any]:
    from ..processing.images import ImageError, load_image

    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    out = []
    for i in range(len(record.images)):
        try:
            source = record.open_image(i)
        except OSError as e:  # unreadable tar member
            raise SkipRecord("corrupt_image", f"{record.id}: {e}") from e
        if isinstance(source, str) and not os.path.exists(source):
            raise SkipRecord("missing_image", f"{record.id}: {source}")
        try:
            out.append(load_image(source, **kwargs))
        except FileNotFoundError as e:
            raise SkipRecord("missing_image", f"{record.id}: {e}") from e
        except (ImageError, OSError, ValueError) as e:
            raise SkipRecord("corrupt_image", f"{record.id}: {e}") from e
    return out


def _encode_text(record: Record, processor: Any, config: DataConfig
                 ) -> tuple[list[int], list[int], list[int] | None]:
    from ..processing import tokenization as tok

    n_images = len(record.images)
    if record.caption is not None:
        if not record.caption.strip():
            raise SkipRecord("empty_caption", record.id)
        if n_images > 1:
            raise SkipRecord("placeholder_mismatch", f"{record.id}: caption pair with {n_images} images")
        try:
            return (*tok.encode_caption(record.caption, processor.tokenizer,
                                        template=config.caption_template, num_images=n_images), None)
        except ValueError as e:
            raise SkipRecord("empty_caption", f"{record.id}: {e}") from e
    messages = record.messages or []
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SkipRecord("no_assistant_turn", record.id)
    n_ph = _count_placeholders(record)
    if n_ph != n_images:
        raise SkipRecord("placeholder_mismatch",
                         f"{record.id}: {n_ph} '{IMAGE_PLACEHOLDER}' for {n_images} images")
    template = config.template or processor.template
    try:
        independent = config.independent_turns if record.independent_turns is None else record.independent_turns
        if independent:
            return tok.encode_independent_turns(messages, processor.tokenizer, template, num_images=n_images)
        return (*tok.encode_conversation(messages, processor.tokenizer, template, num_images=n_images), None)
    except ValueError as e:  # ConversationError: malformed turns, roles, placement
        msg = str(e).lower()
        reason = ("no_assistant_turn" if "no assistant turn" in msg
                  else "placeholder_mismatch" if "placeholder" in msg
                  else "bad_conversation")
        raise SkipRecord(reason, f"{record.id}: {e}") from e


def encode_record(record: Record, processor: Any, config: DataConfig,
                  teacher_fn: TeacherFn | None = None) -> Example:
    """Encode one record (text first, so a broken text costs no image decode); SkipRecord if not."""
    if record.error is not None:
        raise SkipRecord(record.error, record.id)
    ids_list, labels_list, branch_list = _encode_text(record, processor, config)
    input_ids = torch.tensor(ids_list, dtype=torch.long)
    labels = torch.tensor(labels_list, dtype=torch.long)
    n_img = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    if n_img != len(record.images):
        raise SkipRecord("placeholder_mismatch",
                         f"{record.id}: {n_img} placeholder ids for {len(record.images)} images")
    pils = _load_images(record, config.max_pixels)
    pixels = list(processor.image_processor(pils, training=config.training_resize)) if pils else []
    image_tokens = [_image_token_count(processor, p) for p in pixels]
    input_ids, labels, kept = truncate(input_ids, labels, image_tokens, config.max_length)
    branch_ids = None if branch_list is None else torch.tensor(branch_list[: input_ids.numel()], dtype=torch.long)
    if not bool((labels != IGNORE_INDEX).any()):
        raise SkipRecord(NO_LABELS_AFTER_TRUNCATION, record.id)
    if kept < len(pixels):
        logger.debug("%s: truncation dropped %d of %d images", record.id, len(pixels) - kept, len(pixels))
    t_pix = t_mask = None
    if teacher_fn is not None:
        pairs = [teacher_fn(im) for im in pils[:kept]]
        t_pix, t_mask = [p for p, _ in pairs], [m for _, m in pairs]
    return Example(input_ids, labels, pixels[:kept], image_tokens[:kept], t_pix, t_mask,
                   index=record.index, id=record.id, branch_ids=branch_ids)


def teacher_fn_from_processor(processor: Any, **kwargs: Any) -> TeacherFn:
    """v1 PAL teacher hook built on ``EveProcessor.images_for_teacher`` (one image at a time)."""

    def teacher(image: Any) -> tuple[Tensor, Tensor]:
        pixels, masks = processor.images_for_teacher([image], **kwargs)
        return pixels[0], masks[0]

    return teacher


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EveDataset(torch.utils.data.IterableDataset):
    """Stream of :class:`Example` from a :class:`RecordSource`, split over ranks and workers.

    Call :meth:`set_epoch` before each epoch and :meth:`set_position` (samples already consumed,
    all ranks together) when resuming. ``stats`` holds the skip counters of the last iteration in
    this process (each dataloader worker keeps its own copy).
    """

    def __init__(self, source: RecordSource, processor: Any, config: DataConfig | None = None,
                 teacher_fn: TeacherFn | None = None, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        self.source = source
        self.processor = processor
        self.config = config or DataConfig()
        self.teacher_fn = teacher_fn
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self.stats = SkipStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_position(self, position: int) -> None:
        self.position = position

    def split(self) -> Split:
        rank, world = _dist_rank_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return Split.of(rank, world, worker, workers)

    def __iter__(self) -> Iterator[Example]:
        self.stats = stats = SkipStats()
        cfg = self.config
        for record in self.source.iter(self.epoch, self.split(), self.position):
            try:
                example = encode_record(record, self.processor, cfg, self.teacher_fn)
            except SkipRecord as e:
                stats.skip(e.reason)
                logger.debug("skipped %s", e)
                stats.check(cfg.max_broken_fraction, cfg.min_records_for_check)
                continue
            stats.seen()
            yield example
        logger.info("data pass done: %s", stats.summary())

