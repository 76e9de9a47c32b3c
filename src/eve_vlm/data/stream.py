"""The training stream: an endless, deterministic, resumable sequence of collated batches.

This is the one batching type the trainer reads. Its position is the number of batches taken, so
an exact resume replays that many (the same shuffles, the same packing) instead of storing
iterator state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from .batching import BatchConfig, iter_batches
from .dataset import EveDataset
from .order import Split
from .records import Record, RecordSource


class GlobalOrderRecords(RecordSource):
    """Every rank reads the same globally shuffled stream and keeps every n-th record.

    A JSONL reader splits first and shuffles each split with its own buffer, so the records of a
    global batch would depend on the world size. Here rank r of n keeps records r, r+n, ... of the
    one-process order: global step k trains on the same records on 1 or n processes (only lines
    are parsed twice; images are decoded by the rank that keeps them).
    """

    def __init__(self, inner: RecordSource) -> None:
        self.inner = inner

    def iter(self, epoch: int = 0, split: Split = Split(), position: int = 0) -> Iterator[Record]:
        skip = split.skip_for(position)
        mine = 0
        for i, record in enumerate(self.inner.iter(epoch, Split(), 0)):
            if i % split.count != split.index:
                continue
            if mine >= skip:
                yield record
            mine += 1


class BatchStream:
    """Batches of `dataset`, epoch after epoch; `taken` counts the batches handed out."""

    def __init__(self, dataset: EveDataset, config: BatchConfig) -> None:
        self.dataset = dataset
        self.config = config
        self.epoch = 0
        self.taken = 0
        self._it: Iterator[dict[str, Any]] | None = None
        self._skipped: dict[str, int] = {}  # skip counts of finished epochs
        self._seen = 0

    def _start_epoch(self) -> None:
        self.dataset.set_epoch(self.epoch)
        self._it = iter_batches(iter(self.dataset), replace(self.config, seed=self.config.seed + self.epoch))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next()

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
                self.taken += 1
                return batch
            except StopIteration:
                self._add_epoch_stats()
                self.epoch += 1
                self._it = None
        raise RuntimeError("the training data produced no batch (every record was skipped or the data is empty)")

    def _add_epoch_stats(self) -> None:
        stats = self.dataset.stats
        for reason, n in stats.counts.items():
            self._skipped[reason] = self._skipped.get(reason, 0) + n
        self._seen += stats.total_seen

    def skip_counts(self) -> tuple[dict[str, int], int]:
        """Skipped records by reason and records read, over every epoch so far (this process).

        The dataset's own stats restart with each pass; a run's report must cover all of them.
        """
        counts = dict(self._skipped)
        if self._it is not None:  # the pass in progress
            for reason, n in self.dataset.stats.counts.items():
                counts[reason] = counts.get(reason, 0) + n
            return counts, self._seen + self.dataset.stats.total_seen
        return counts, self._seen

    def skip(self, n: int) -> None:
        """Replay n batches (exact resume: same shuffles, same packing)."""
        for _ in range(n):
            self.next()
