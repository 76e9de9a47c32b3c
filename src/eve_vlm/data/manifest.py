"""JSON / JSONL manifests: the training reader and the raw reader of the curation tools.

A JSON file holds one list of records and is loaded and permuted as a whole; a JSONL file (one
record per line) is streamed, so corpora of tens of millions of lines never sit in memory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from .order import Split, seeded_rng, shuffle_buffer, skip_and_index
from .records import ReaderConfig, Record, RecordSource, record_from_dict

logger = logging.getLogger(__name__)


def is_jsonl(path: str) -> bool:
    """JSONL by extension (``.jsonl`` / ``.ndjson`` vs ``.json``), else by content: a JSON list starts with '['."""
    if path.endswith((".jsonl", ".ndjson")):
        return True
    if path.endswith(".json"):
        return False
    with open(path, encoding="utf-8") as f:
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


class JsonRecords(RecordSource):
    """A JSON list (loaded, permuted as a whole) or a JSONL file (streamed line by line)."""

    def __init__(self, path: str, config: ReaderConfig | None = None):
        self.path = path
        self.config = config or ReaderConfig()
        self.image_root = self.config.image_root or os.path.dirname(os.path.abspath(path))
        self.is_jsonl = is_jsonl(path)
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
                                    seeded_rng(cfg.seed, epoch, split.index))
            for i, (lineno, raw) in skip_and_index(stream, skip):
                yield self._parse_line(raw, lineno, i)
        else:
            items = self._load_list()
            order = list(range(len(items)))
            if cfg.shuffle:
                seeded_rng(cfg.seed, epoch).shuffle(order)
            mine = order[split.index::split.count]
            for i, j in skip_and_index(mine, skip):
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


def iter_manifest(path: str) -> Iterator[tuple[int, Any]]:
    """Raw objects of a JSON / JSONL manifest in file order, for curation tools (bad lines: None)."""
    if is_jsonl(path):
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
