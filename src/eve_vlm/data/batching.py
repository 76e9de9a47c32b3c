"""Batches in the model's format: right padding, length grouping, and sequence packing.

Visual token counts vary from a handful to thousands per image (v1: 126-2353, v2: about 3-2600),
so padding every row to the longest sample wastes most of the compute. Two remedies live here: length-grouped
batching (similar lengths share a batch, as the official ``group_by_modality_length``) and packing
(several samples per row, kept apart by ``segment_ids``). :func:`padding_waste` measures both.

Batch format (what the model consumes)::

    input_ids      LongTensor [B, T]  text ids, IMAGE_TOKEN_INDEX per image, right-padded with pad id
    labels         LongTensor [B, T]  IGNORE_INDEX on padding
    attention_mask LongTensor [B, T]  1 = real token
    segment_ids    LongTensor [B, T]  packed batches only: 1, 2, ... per sample in a row, 0 = pad
    branch_ids     LongTensor [B, T]  only when an example has independent turns: 0 = shared
                                      prefix (and plain samples, padding), k = turn k
    images         list[Tensor[3,H,W]] in placeholder order (row-major, then left to right)
    teacher_pixels [N, 3, S, S], teacher_masks [N, g, g]  only when examples carry teacher inputs
    stats          dict[str, int]     what the batch costs (:func:`batch_cost`), for the metrics log

The first label of every sample is set to IGNORE_INDEX: a causal loss can never predict it from
inside its own sample, and in a packed row it would otherwise be "predicted" from the previous
sample's last token. Padded and packed batches therefore carry exactly the same supervision.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ..constants import IGNORE_INDEX
from .dataset import Example

# --------------------------------------------------------------------------------------------
# collators


def _sample_labels(ex: Example) -> Tensor:
    labels = ex.labels.clone()
    if labels.numel():
        labels[0] = IGNORE_INDEX
    return labels


def _images_and_teacher(examples: Sequence[Example]) -> dict[str, object]:
    out: dict[str, object] = {"images": [im for ex in examples for im in ex.images]}
    with_teacher = [ex.teacher_pixels is not None for ex in examples if ex.images]
    if any(with_teacher):
        if not all(with_teacher):
            raise ValueError("some examples carry teacher inputs and some do not: use one teacher_fn")
        pixels = [p for ex in examples for p in (ex.teacher_pixels or [])]
        masks = [m for ex in examples for m in (ex.teacher_masks or [])]
        out["teacher_pixels"] = torch.stack(pixels)
        out["teacher_masks"] = torch.stack(masks)
    return out


def _branches(examples: Sequence[Example]) -> list[Tensor] | None:
    """Branch ids per example (zeros for plain ones), or None when no example has branches."""
    if all(ex.branch_ids is None for ex in examples):
        return None
    return [torch.zeros_like(ex.input_ids) if ex.branch_ids is None else ex.branch_ids for ex in examples]


def _padded_ids(rows: list[Tensor], width: int) -> Tensor:
    out = pad_sequence(rows, batch_first=True, padding_value=0)
    return torch.nn.functional.pad(out, (0, width - out.shape[1]), value=0)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _pad_rows(ids: list[Tensor], labels: list[Tensor], pad_id: int, multiple: int | None
              ) -> dict[str, Tensor]:
    T = _round_up(max(int(t.numel()) for t in ids), multiple)
    ids_b = pad_sequence(ids, batch_first=True, padding_value=pad_id)
    lab_b = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
    lengths = torch.tensor([t.numel() for t in ids])
    if ids_b.shape[1] < T:
        extra = T - ids_b.shape[1]
        ids_b = torch.nn.functional.pad(ids_b, (0, extra), value=pad_id)
        lab_b = torch.nn.functional.pad(lab_b, (0, extra), value=IGNORE_INDEX)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids_b, "labels": lab_b, "attention_mask": mask}


def merge_shared_prefixes(examples: Sequence[Example]) -> list[Example]:
    """Examples with independent turns whose shared prefixes are identical (same ids, same image
    pixels) share rows: the prefix once, then the branches of several examples, renumbered, as
    long as the merged row is no longer than the batch's longest row.

    Why: this is exact (each branch still sees only the prefix and itself) and saves the repeated
    prefix, e.g. in a blind baseline where every record shows the same blank image. The length cap
    keeps it a saving: the batch is padded to its longest row, and on a CPU one row of four
    ~200-token examples trained ~1.1x slower than four rows (attention grows with the square of
    the row length), for an 8% saving in tokens. Examples without branches, or with teacher
    inputs, pass through unchanged.
    """
    cap = max((ex.spliced_length for ex in examples), default=0)
    by_prefix: dict[tuple, list[Example]] = {}
    out: list[Example | tuple] = []
    for ex in examples:
        if ex.branch_ids is None or ex.teacher_pixels is not None:
            out.append(ex)
            continue
        key = tuple(ex.input_ids[ex.branch_ids == 0].tolist())
        if key not in by_prefix:
            by_prefix[key] = []
            out.append(key)
        by_prefix[key].append(ex)
    merged: list[Example] = []
    for item in out:
        if isinstance(item, Example):
            merged.append(item)
            continue
        group = by_prefix[item]
        if len(group) == 1:  # the usual case: pixels are hashed only when prefix ids collide
            merged.append(group[0])
            continue
        by_pixels: dict[tuple, list[Example]] = {}
        for ex in group:
            digest = tuple(hashlib.sha1(im.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                           for im in ex.images)
            by_pixels.setdefault(digest, []).append(ex)
        for same in by_pixels.values():
            merged.extend(_merge(row) for row in _fill_rows(same, cap))
    return merged


def _fill_rows(group: list[Example], cap: int) -> list[list[Example]]:
    """Examples sharing one prefix, in order, into rows no longer than `cap` tokens (first fit)."""
    prefix = group[0].spliced_length - int((group[0].branch_ids != 0).sum())  # type: ignore[union-attr]
    rows: list[list[Example]] = []
    lengths: list[int] = []
    for ex in group:
        own = ex.spliced_length - prefix
        fit = next((i for i, n in enumerate(lengths) if n + own <= cap), None)
        if fit is None:
            rows.append([ex])
            lengths.append(ex.spliced_length)
        else:
            rows[fit].append(ex)
            lengths[fit] += own
    return rows


def _merge(group: list[Example]) -> Example:
    if len(group) == 1:
        return group[0]
    first = group[0]
    prefix = first.branch_ids == 0  # type: ignore[operator]
    ids, labels, branches = [first.input_ids[prefix]], [first.labels[prefix]], [first.branch_ids[prefix]]  # type: ignore[index]
    offset = 0
    for ex in group:
        own = ex.branch_ids != 0  # type: ignore[operator]
        ids.append(ex.input_ids[own])
        labels.append(ex.labels[own])
        branches.append(ex.branch_ids[own] + offset)  # type: ignore[index]
        offset += int(ex.branch_ids.max())  # type: ignore[union-attr]
    return Example(torch.cat(ids), torch.cat(labels), first.images, first.image_tokens,
                   index=first.index, id="+".join(ex.id for ex in group), branch_ids=torch.cat(branches))


def collate_padded(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int | None = None
                   ) -> dict[str, object]:
    """One example per row, right-padded to the longest text (the model pads after splicing);
    examples whose independent turns share an identical prefix share rows where that keeps the
    batch's longest row (`merge_shared_prefixes`)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    examples = merge_shared_prefixes(examples)
    batch: dict[str, object] = dict(_pad_rows([ex.input_ids for ex in examples],
                                              [_sample_labels(ex) for ex in examples],
                                              pad_id, pad_to_multiple_of))
    branches = _branches(examples)
    if branches is not None:
        batch["branch_ids"] = _padded_ids(branches, batch["input_ids"].shape[1])  # type: ignore[union-attr]
    batch.update(_images_and_teacher(examples))
    lengths = [ex.spliced_length for ex in examples]
    batch["stats"] = batch_cost([[n] for n in lengths], packed=False)
    return batch


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, pad_to_multiple_of: int | None = None
                   ) -> dict[str, object]:
    """Several examples per row, concatenated, with ``segment_ids`` 1..k per row and 0 on padding.

    The model attends per document in such rows (``eve_vlm.model.attention``), so a row costs what
    its samples cost and rows can be long: fill them up to the budget (`pack_examples`)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("cannot collate an empty row")
    ids = [torch.cat([ex.input_ids for ex in row]) for row in rows]
    labels = [torch.cat([_sample_labels(ex) for ex in row]) for row in rows]
    segs = [torch.repeat_interleave(torch.arange(1, len(row) + 1),
                                    torch.tensor([ex.input_ids.numel() for ex in row]))
            for row in rows]
    batch: dict[str, object] = dict(_pad_rows(ids, labels, pad_id, pad_to_multiple_of))
    T = batch["input_ids"].shape[1]  # type: ignore[union-attr]
    batch["segment_ids"] = _padded_ids(segs, T)
    branches = _branches([ex for row in rows for ex in row])
    if branches is not None:
        it = iter(branches)
        batch["branch_ids"] = _padded_ids([torch.cat([next(it) for _ in row]) for row in rows], T)
    batch.update(_images_and_teacher([ex for row in rows for ex in row]))
    batch["stats"] = batch_cost([[ex.spliced_length for ex in row] for row in rows], packed=True)
    return batch


def causal_pairs(n: int) -> int:
    """Query-key pairs of causal attention over n tokens (attention FLOPs are proportional)."""
    return n * (n + 1) // 2


def batch_cost(rows: Sequence[Sequence[int]], packed: bool) -> dict[str, int]:
    """Tokens and attention work of a batch whose rows hold samples of the given spliced lengths.

    ``tokens`` are real, ``slots`` = rows x the longest row (the model pads rows after splicing).
    ``attn_pairs_needed`` is what the samples need (causal pairs of each alone);
    ``attn_pairs_spent`` is what the decoder computes: in packed rows, per document (its default
    document attention skips padding and other documents); in padded rows, every row over the
    longest. The ratio of the two (and 1 - tokens / slots) is the waste the metrics log reports.
    """
    lengths = [sum(r) for r in rows]
    longest = max(lengths, default=0)
    needed = sum(causal_pairs(n) for r in rows for n in r)
    return {
        "tokens": sum(lengths),
        "slots": longest * len(rows),
        "attn_pairs_needed": needed,
        "attn_pairs_spent": needed if packed else causal_pairs(longest) * len(rows),
    }


def padding_waste(batch_lengths: Sequence[int], row_length: int | None = None) -> float:
    """Fraction of compute slots that are padding: rows of the given (spliced) lengths padded to
    ``row_length`` (default: the longest row)."""
    if len(batch_lengths) == 0:
        return 0.0
    lengths = torch.as_tensor(list(batch_lengths), dtype=torch.float64)
    row = float(lengths.max()) if row_length is None else float(row_length)
    if row <= 0:
        return 0.0
    if float(lengths.max()) > row:
        raise ValueError(f"a row of length {int(lengths.max())} exceeds row_length {row_length}")
    return float(1.0 - lengths.sum() / (row * lengths.numel()))


# --------------------------------------------------------------------------------------------
# packing


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: indices grouped into bins of total length <= max_length.

    Bins come out in creation order (longest item first); inside a bin, indices keep the order in
    which FFD placed them (decreasing length).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"sample {i} has {n} spliced tokens > max_length {max_length}; truncate first")
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(max_length - n)
    return bins


def pack_examples(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Group examples into rows of at most ``max_length`` spliced tokens (FFD)."""
    bins = pack_lengths([ex.spliced_length for ex in examples], max_length)
    return [[examples[i] for i in b] for b in bins]


@dataclass
class StreamingPacker:
    """Pack a stream: buffer ``buffer_size`` examples, FFD them, emit the rows, repeat."""

    max_length: int
    buffer_size: int = 256

    def __call__(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        buf: list[Example] = []
        for ex in examples:
            buf.append(ex)
            if len(buf) >= self.buffer_size:
                yield from pack_examples(buf, self.max_length)
                buf = []
        if buf:
            yield from pack_examples(buf, self.max_length)


# --------------------------------------------------------------------------------------------
# length grouping


def length_grouped_batches(lengths: Sequence[int], batch_size: int, megabatch_size: int | None = None,
                           seed: int = 0, modalities: Sequence[bool] | None = None,
                           drop_last: bool = False) -> list[list[int]]:
    """Index batches of similar length (for map-style data with precomputed lengths).

    Shuffle, cut into megabatches, sort each by length (longest first), cut into batches, shuffle
    the batches. With ``modalities`` (True = has an image), image and text-only samples never share
    a batch (the official ``group_by_modality_length``). Deterministic for a given seed.
    """
    rng = random.Random(seed)
    mega = megabatch_size or batch_size * 32
    groups = [list(range(len(lengths)))]
    if modalities is not None:
        groups = [[i for i, m in enumerate(modalities) if m], [i for i, m in enumerate(modalities) if not m]]
    batches: list[list[int]] = []
    for group in groups:
        rng.shuffle(group)
        for s in range(0, len(group), mega):
            chunk = sorted(group[s:s + mega], key=lambda i: -lengths[i])
            batches.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


@dataclass
class LengthGroupedBatcher:
    """Streaming length grouping: per-modality buffers of ``megabatch_size`` examples are sorted
    by spliced length, cut into batches, and the batches are emitted in a seeded random order."""

    batch_size: int
    megabatch_size: int | None = None
    by_modality: bool = True
    seed: int = 0
    drop_last: bool = False

    def __call__(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        rng = random.Random(self.seed)
        mega = self.megabatch_size or self.batch_size * 32
        buffers: dict[bool, list[Example]] = {True: [], False: []}
        for ex in examples:
            key = ex.has_image if self.by_modality else True
            buffers[key].append(ex)
            if len(buffers[key]) >= mega:
                yield from self._flush(buffers[key], rng)
                buffers[key] = []
        for buf in buffers.values():
            if buf:
                yield from self._flush(buf, rng)

    def _flush(self, buf: list[Example], rng: random.Random) -> Iterator[list[Example]]:
        buf = sorted(buf, key=lambda ex: -ex.spliced_length)
        batches = [buf[k:k + self.batch_size] for k in range(0, len(buf), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        yield from batches


# --------------------------------------------------------------------------------------------
# one entry point


@dataclass
class BatchConfig:
    """How examples become batches. ``pack``: rows of several samples (``batch_size`` rows)."""

    batch_size: int = 8
    pad_id: int = 0
    pack: bool = False
    max_length: int = 2048  # row budget in spliced tokens when packing
    pack_buffer: int = 256
    group_by_length: bool = False
    group_by_modality: bool = True
    megabatch_size: int | None = None
    pad_to_multiple_of: int | None = None
    seed: int = 0
    drop_last: bool = False


def iter_batches(examples: Iterable[Example], config: BatchConfig) -> Iterator[dict[str, object]]:
    """Turn an example stream into model batches (padded, length-grouped, or packed)."""
    c = config
    if c.pack:
        rows: list[list[Example]] = []
        for row in StreamingPacker(c.max_length, c.pack_buffer)(examples):
            rows.append(row)
            if len(rows) == c.batch_size:
                yield collate_packed(rows, c.pad_id, c.pad_to_multiple_of)
                rows = []
        if rows and not c.drop_last:
            yield collate_packed(rows, c.pad_id, c.pad_to_multiple_of)
        return
    if c.group_by_length:
        groups: Iterable[list[Example]] = LengthGroupedBatcher(
            c.batch_size, c.megabatch_size, c.group_by_modality, c.seed, c.drop_last)(examples)
    else:
        groups = _chunks(examples, c.batch_size, c.drop_last)
    for group in groups:
        yield collate_padded(group, c.pad_id, c.pad_to_multiple_of)


class EveBatches(torch.utils.data.IterableDataset):
    """Batches built inside dataloader workers: ``DataLoader(EveBatches(ds, cfg), batch_size=None)``.

    Each worker encodes, groups / packs and collates its own split, so the main process only
    receives finished batch dicts. A worker's batches depend only on the seed, the epoch and its
    split (rank, world size, worker, number of workers), and a DataLoader takes them round-robin
    over the workers in a fixed order, so the whole stream replays exactly: a resume that skips the
    batches already taken gets the same batches, as long as the world size and the number of
    workers are the same (they decide which records each split reads). Without workers the stream
    equals ``iter_batches`` over the dataset with seed ``config.seed + epoch``.

    Each batch carries ``data_stats``: the skip counters of the current pass of the split that built
    it, ``{"split": index, "seen": n, "skipped": {reason: n}}``, cumulative, so the last one of each
    split, summed, gives the pass's totals (:func:`merge_data_stats`): a worker's own
    ``EveDataset.stats`` never reaches the main process.
    """

    def __init__(self, dataset: Iterable[Example], config: BatchConfig):
        super().__init__()
        self.dataset = dataset
        self.config = config
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    def set_position(self, position: int) -> None:
        self.dataset.set_position(position)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[dict[str, object]]:
        config = replace(self.config, seed=self.config.seed + self.epoch)
        split = getattr(self.dataset, "split", None)
        index = split().index if callable(split) else 0
        batches = iter_batches(iter(self.dataset), config)
        # One batch of look-ahead: the last batch leaves only once the pass is over, so its stats
        # also count the records skipped after the last example it holds.
        held = next(batches, None)
        while held is not None:
            following = next(batches, None)
            stats = getattr(self.dataset, "stats", None)
            if stats is not None:
                held["data_stats"] = {"split": index, "seen": stats.total_seen, "skipped": dict(stats.counts)}
            yield held
            held = following


def merge_data_stats(snapshots: Iterable[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """(skipped records by reason, records seen) over all splits, from batches' ``data_stats``.

    A snapshot is cumulative within its split's pass, so only the last one of each split counts.
    """
    last: dict[int, dict[str, Any]] = {}
    for snap in snapshots:
        last[int(snap["split"])] = snap
    skipped: dict[str, int] = {}
    for snap in last.values():
        for reason, n in snap["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
    return skipped, sum(int(s["seen"]) for s in last.values())


def _chunks(items: Iterable[Example], n: int, drop_last: bool) -> Iterator[list[Example]]:
    buf: list[Example] = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf and not drop_last:
        yield buf
