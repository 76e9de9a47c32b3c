"""WebDataset-style tar shards read with :mod:`tarfile` (no webdataset dependency).

A shard holds samples as consecutive members sharing a key: ``KEY.jpg|png|jpeg|webp`` plus
``KEY.txt`` (a caption) or ``KEY.json`` (a conversation record whose image is the member). Only
headers are read while iterating; member bytes are read when a sample is encoded, so shuffle
buffers and resume skips cost no image I/O. Order / split / resume rules: ``order.py``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .order import Split, seeded_rng, shuffle_buffer, skip_and_index
from .records import (
    IMAGE_EXTENSIONS,
    ImageRef,
    ReaderConfig,
    Record,
    RecordSource,
    TarMember,
    record_from_dict,
)

logger = logging.getLogger(__name__)


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Expand ``shard-{000..009}.tar`` brace ranges, ``a-{x,y}.tar`` lists and globs, sorted."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    out: list[str] = []
    for p in patterns:
        for q in _expand_braces(p):
            matches = sorted(glob.glob(q)) if glob.has_magic(q) else [q]
            out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    missing = [p for p in out if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"shards not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return out


_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [e for opt in options for e in _expand_braces(head + opt + tail)]


@dataclass
class _TarSample:
    key: str
    members: dict[str, TarMember]


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(d, stem), ext.lower() if dot else ""


def iter_tar_samples(shard: str) -> Iterator[_TarSample]:
    """Group consecutive members of one shard by key, reading only headers (data stays on disk)."""
    current: _TarSample | None = None
    with tarfile.open(shard, "r:") as tf:
        for info in tf:
            if not info.isfile():
                continue
            key, ext = _split_key(info.name)
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current = _TarSample(key, {})
            current.members[ext] = TarMember(shard, info.name, info.offset_data, info.size)
    if current is not None:
        yield current


class TarRecords(RecordSource):
    """WebDataset-style shards: ``KEY.jpg|png|jpeg|webp`` + ``KEY.txt`` (caption) or ``KEY.json``."""

    def __init__(self, shards: str | Sequence[str], config: ReaderConfig | None = None):
        self.shards = expand_shards(shards)
        self.config = config or ReaderConfig()

    def iter(self, epoch: int = 0, split: Split = Split(), position: int = 0) -> Iterator[Record]:
        cfg = self.config
        shards = list(self.shards)
        if cfg.shuffle:
            seeded_rng(cfg.seed, epoch).shuffle(shards)
        by_shard = len(shards) >= split.count
        if by_shard:
            samples: Iterable[_TarSample] = (
                s for shard in shards[split.index::split.count] for s in iter_tar_samples(shard))
        else:
            samples = (s for k, s in enumerate(t for shard in shards for t in iter_tar_samples(shard))
                       if k % split.count == split.index)
        stream = shuffle_buffer(samples, cfg.shuffle_buffer if cfg.shuffle else 0,
                                seeded_rng(cfg.seed, epoch, split.index))
        for i, sample in skip_and_index(stream, split.skip_for(position)):
            yield self._to_record(sample, i)

    def _to_record(self, sample: _TarSample, index: int) -> Record:
        m = sample.members
        images: list[ImageRef] = [m[e] for e in IMAGE_EXTENSIONS if e in m][:1]
        try:
            if "json" in m:
                obj = json.loads(m["json"].read().decode("utf-8"))
                if isinstance(obj, dict):
                    obj = {k: v for k, v in obj.items() if k != "image"}  # the image is the member
                rec = record_from_dict(obj, default_id=sample.key)
                rec.images = images
            elif "txt" in m:
                rec = Record(id=sample.key, images=images, caption=m["txt"].read().decode("utf-8"))
            else:
                raise ValueError(f"sample {sample.key!r} has neither .txt nor .json")
        except json.JSONDecodeError:
            return Record(id=sample.key, error="bad_json", index=index)
        except (ValueError, UnicodeDecodeError) as e:
            logger.debug("%s", e)
            return Record(id=sample.key, error="bad_record", index=index)
        if rec.caption is not None and not images:
            return Record(id=sample.key, error="missing_image", index=index)
        rec.id = sample.key
        rec.index = index
        return rec
