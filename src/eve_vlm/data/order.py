"""Order, split and resume: the one rule every record reader follows.

1. the source is put in a seeded order (JSON lists: a permutation of all records; tar shards: a
   permutation of the shard list; JSONL: file order, as a 33M-line file is never held in memory);
2. split ``i`` of ``n`` takes every n-th item (tar: every n-th *shard* when there are at least as
   many shards as splits, else every n-th sample);
3. a seeded shuffle buffer mixes each split's stream (JSONL and tar);
4. resuming: ``position`` counts samples consumed by all splits together (assumed to have consumed
   equally, as data-parallel ranks do); split ``i`` skips ``len(range(i, position, n))`` of its own.

A fixed (seed, epoch, split) therefore always yields the same stream, which is what makes a resume
exact without storing iterator state.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


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


def seeded_rng(seed: int, epoch: int, salt: int = 0) -> random.Random:
    """The generator of one (seed, epoch, split) stream; string seeding is stable across runs."""
    return random.Random(f"{seed}:{epoch}:{salt}")


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
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


def skip_and_index(items: Iterable[T], skip: int) -> Iterator[tuple[int, T]]:
    """(position in the stream, item) pairs, the first ``skip`` items left out (a resume)."""
    for i, item in enumerate(items):
        if i >= skip:
            yield i, item
