"""Training records and their readers: JSON / JSONL manifests (tar shards: ``webdataset.py``).

Every reader yields :class:`Record` objects in a deterministic order (given a seed and an epoch),
can be split over data-parallel ranks x dataloader workers, and can resume after a number of
already-consumed samples. Parsing is lazy: a reader never decodes images, and a record that cannot
be parsed is yielded with ``error`` set so the dataset layer can count it instead of crashing.

Order and splitting (the same rule for every source):

1. the source is put in a seeded order (JSON lists: a permutation of all records; tar shards: a
   permutation of the shard list; JSONL: file order, as a 33M-line file is never held in memory);
2. split ``i`` of ``n`` takes every n-th item (tar: every n-th *shard* when there are at least as
   many shards as splits, else every n-th sample);
3. a seeded shuffle buffer mixes each split's stream (JSONL and tar);
4. resuming: ``position`` counts samples consumed by all splits together (assumed to have consumed
   equally, as data-parallel ranks do); split ``i`` skips ``len(range(i, position, n))`` of its own.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "system": "system"}


# --------------------------------------------------------------------------------------------
# records


@dataclass
class TarMember:
    """Location of one file inside a tar shard; read lazily so buffers and skips stay cheap."""

    shard: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"truncated tar member {self.name} in {self.shard}")
        return data


ImageRef = str | TarMember  # a file path, or a member of a tar shard


@dataclass
class Record:
    """One training sample before encoding.

    ``messages`` is a chat as ``[{"role": "user"|"assistant"|"system", "content": str}]`` (LLaVA
    ``from``/``value`` keys are converted); caption pairs set ``caption`` instead. ``error`` names
    why a record could not be parsed (``bad_json``, ``bad_record``); it is then otherwise empty.
    """

    id: str
    images: list[ImageRef] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None
    caption: str | None = None
    error: str | None = None
    index: int = -1  # position in the split's stream (after shuffling), for resume bookkeeping

    @property
    def has_image(self) -> bool:
        return len(self.images) > 0

    def open_image(self, i: int) -> str | bytes:
        """A source for ``load_image``: a path, or the bytes of a tar member."""
        ref = self.images[i]
        return ref.read() if isinstance(ref, TarMember) else ref


def _resolve(path: str, image_root: str | None) -> str:
    if image_root is None or os.path.isabs(path):
        return path
    return os.path.join(image_root, path)


def record_from_dict(obj: Any, image_root: str | None = None, default_id: str = "") -> Record:
    """Convert a LLaVA-style conversation dict or an ``{"image", "caption"}`` pair to a Record.

    Raises ValueError naming the problem for anything else.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"record must be a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", default_id))
    image = obj.get("image")
    if image is None:
        images: list[ImageRef] = []
    elif isinstance(image, str):
        images = [_resolve(image, image_root)]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = [_resolve(p, image_root) for p in image]
    else:
        raise ValueError(f"record {rid!r}: 'image' must be a string or a list of strings")
    if "conversations" in obj:
        convs = obj["conversations"]
        if not isinstance(convs, list):
            raise ValueError(f"record {rid!r}: 'conversations' must be a list")
        messages = []
        for turn in convs:
            if not isinstance(turn, dict):
                raise ValueError(f"record {rid!r}: conversation turn is not an object")
            role = ROLE_MAP.get(str(turn.get("from", turn.get("role", ""))).lower())
            value = turn.get("value", turn.get("content"))
            if role is None or not isinstance(value, str):
                raise ValueError(f"record {rid!r}: turn needs 'from' (human|gpt) and a string 'value'")
            messages.append({"role": role, "content": value})
        return Record(id=rid, images=images, messages=messages)
    if "caption" in obj:
        caption = obj["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"record {rid!r}: 'caption' must be a string")
        return Record(id=rid, images=images, caption=caption)
    raise ValueError(f"record {rid!r}: needs 'conversations' or 'caption'")


# --------------------------------------------------------------------------------------------
# order, split, resume helpers


@dataclass(frozen=True)
class Split:
    """Which part of the data this iterator reads: ``index`` of ``count`` (ranks x workers)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"invalid split {self.index} of {self.count}")

    @classmethod
    def of(cls, rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> Split:
        """Rank-major layout: every (rank, worker) pair gets a distinct split."""
        return cls(rank * num_workers + worker, world_size * num_workers)

    def skip_for(self, position: int) -> int:
        """How many of this split's samples belong to the first ``position`` global samples."""
        return len(range(self.index, max(position, 0), self.count))


def _rng(seed: int, epoch: int, salt: int = 0) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{salt}")


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Deterministic reservoir-style shuffle with a bounded buffer (``size`` <= 1: no shuffle)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _skip_and_index(items: Iterable[Any], skip: int) -> Iterator[tuple[int, Any]]:
    for i, item in enumerate(items):
        if i >= skip:
            yield i, item


# --------------------------------------------------------------------------------------------
# sources


@dataclass
class ReaderConfig:
    """Order / split / resume settings shared by every reader."""

    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    image_root: str | None = None  # default: the manifest's directory


class RecordSource:
    """Base class: ``iter(epoch, split, position)`` yields Records; subclasses implement it."""

    def iter(self, epoch: int = 0, split: Split = Split(), position: int = 0) -> Iterator[Record]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        return self.iter()


class JsonRecords(RecordSource):
    """A JSON list (loaded, permuted as a whole) or a JSONL file (streamed line by line)."""

    def __init__(self, path: str, config: ReaderConfig | None = None):
        self.path = path
        self.config = config or ReaderConfig()
        self.image_root = self.config.image_root or os.path.dirname(os.path.abspath(path))
        self.is_jsonl = _is_jsonl(path)
        self._items: list[Any] | None = None

    def _load_list(self) -> list[Any]:
        if self._items is None:
            with open(self.path, encoding="utf-8") as f:
                items = json.load(f)
            if not isinstance(items, list):
                raise ValueError(f"{self.path}: a .json manifest must hold a list of records")
            self._items = items
        return self._items

    def iter(self, epoch: int = 0, split: Split = Split(), position: int = 0) -> Iterator[Record]:
        cfg = self.config
        skip = split.skip_for(position)
        if self.is_jsonl:
            lines = _iter_lines(self.path, split)  # (line number, raw text), split applied
            stream = shuffle_buffer(lines, cfg.shuffle_buffer if cfg.shuffle else 0,
                                    _rng(cfg.seed, epoch, split.index))
            for i, (lineno, raw) in _skip_and_index(stream, skip):
                yield self._parse_line(raw, lineno, i)
        else:
            items = self._load_list()
            order = list(range(len(items)))
            if cfg.shuffle:
                _rng(cfg.seed, epoch).shuffle(order)
            mine = order[split.index::split.count]
            for i, j in _skip_and_index(mine, skip):
                yield self._to_record(items[j], j, i)

    def _parse_line(self, raw: str, lineno: int, index: int) -> Record:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            logger.debug("%s:%d: bad JSON (%s)", self.path, lineno + 1, e)
            return Record(id=f"{self.path}:{lineno + 1}", error="bad_json", index=index)
        return self._to_record(obj, lineno, index)

    def _to_record(self, obj: Any, n: int, index: int) -> Record:
        try:
            rec = record_from_dict(obj, self.image_root, default_id=str(n))
        except ValueError as e:
            logger.debug("%s: %s", self.path, e)
            return Record(id=str(n), error="bad_record", index=index)
        rec.index = index
        return rec


def _is_jsonl(path: str) -> bool:
    if path.endswith((".jsonl", ".ndjson")):
        return True
    if path.endswith(".json"):
        return False
    with open(path, encoding="utf-8") as f:  # sniff: a JSON list starts with '['
        for line in f:
            if line.strip():
                return not line.lstrip().startswith("[")
    return True


def _iter_lines(path: str, split: Split) -> Iterator[tuple[int, str]]:
    """Non-empty lines as (line number, text); split ``i`` of ``n`` takes every n-th one."""
    k = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            if k % split.count == split.index:
                yield lineno, line
            k += 1


def open_records(path: str | Sequence[str], config: ReaderConfig | None = None) -> RecordSource:
    """Pick the reader from the path: ``*.tar`` (glob / brace patterns allowed) or JSON / JSONL."""
    if not isinstance(path, str) or ".tar" in path:
        from .webdataset import TarRecords

        return TarRecords(path, config)
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    return JsonRecords(path, config)


def iter_manifest(path: str) -> Iterator[tuple[int, Any]]:
    """Raw objects of a JSON / JSONL manifest in file order, for curation tools (bad lines: None)."""
    if _is_jsonl(path):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f):
                if line.strip():
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError:
                        yield lineno, None
    else:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(json.load(f))

