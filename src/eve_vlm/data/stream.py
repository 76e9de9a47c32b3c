"""The training stream: an endless, deterministic, resumable sequence of collated batches.

This is the one batching type the trainer reads. Its position is the number of batches taken, so
an exact resume replays that many (the same shuffles, the same packing) instead of storing
iterator state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .batching import BatchConfig, EveBatches, merge_data_stats
from .dataset import EveDataset
from .order import Split
from .records import Record, RecordSource


class EmptyTrainingData(ValueError):
    """The training data yields no batch at all: every record was skipped, or there are none."""


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
    """Batches of `dataset`, epoch after epoch; `taken` counts the batches handed out.

    The batches are built by `EveBatches`, in this process or, with `num_workers`, in DataLoader
    workers (encoding and image decoding then overlap the training step). Either way the stream
    replays exactly for the same seed, world size and number of workers.
    """

    def __init__(self, dataset: EveDataset, config: BatchConfig, num_workers: int = 0) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = EveBatches(dataset, config)
        self.num_workers = num_workers
        self.epoch = 0
        self.taken = 0
        self._it: Iterator[dict[str, Any]] | None = None
        self._pass: list[dict[str, Any]] = []  # data_stats of the pass in progress
        self._skipped: dict[str, int] = {}  # skip counts of finished passes
        self._seen = 0

    def _start_epoch(self) -> None:
        self.source.set_epoch(self.epoch)
        if self.num_workers:
            from torch.utils.data import DataLoader

            self._it = iter(DataLoader(self.source, batch_size=None, num_workers=self.num_workers))
        else:
            self._it = iter(self.source)
        self._pass = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next()

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                skipped, seen = merge_data_stats(self._pass)
                for reason, n in skipped.items():
                    self._skipped[reason] = self._skipped.get(reason, 0) + n
                self._seen += seen
                self.epoch += 1
                self._it = None
                continue
            stats = batch.pop("data_stats", None)
            if stats is not None:
                self._pass.append(stats)
            self.taken += 1
            return batch
        raise EmptyTrainingData("the training data produced no batch (every record was skipped or the data is empty)")

    def skip_counts(self) -> tuple[dict[str, int], int]:
        """Skipped records by reason and records read, over every pass so far (this process)."""
        skipped, seen = merge_data_stats(self._pass)
        for reason, n in self._skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        return skipped, seen + self._seen

    def skip(self, n: int) -> None:
        """Replay n batches (exact resume: same shuffles, same packing)."""
        for _ in range(n):
            self.next()
