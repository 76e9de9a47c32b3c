"""Collators, packing, length grouping and padding waste on synthetic examples."""

from __future__ import annotations

import random

import pytest
import torch

from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.data import (
    BatchConfig,
    Example,
    LengthGroupedBatcher,
    StreamingPacker,
    collate_packed,
    collate_padded,
    iter_batches,
    length_grouped_batches,
    pack_examples,
    pack_lengths,
    padding_waste,
)

torch.set_num_threads(1)
PAD = 0


def make_example(i: int, n_text: int, image_sides: list[int], teacher: bool = False) -> Example:
    """Text ids start with the images; every image of side s costs 1 + s * (s + 1) tokens."""
    g = torch.Generator().manual_seed(i)
    n_img = len(image_sides)
    text = torch.randint(1, 1000, (n_text,), generator=g)
    ids = torch.cat([torch.full((n_img,), IMAGE_TOKEN_INDEX), text])
    labels = ids.clone()
    labels[: n_img + n_text // 2] = IGNORE_INDEX
    images = [torch.full((3, 8 * s, 8 * s), float(i)) for s in image_sides]
    tp = [torch.full((3, 4, 4), float(i)) for _ in image_sides] if teacher else None
    tm = [torch.ones(2, 2, dtype=torch.bool) for _ in image_sides] if teacher else None
    return Example(ids, labels, images, [1 + s * (s + 1) for s in image_sides], tp, tm, index=i, id=f"e{i}")


def mixed_examples(n: int = 40, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sides = [] if i % 4 == 0 else [rng.choice([2, 3, 6, 9])]
        out.append(make_example(i, rng.randint(4, 60), sides))
    return out


def test_collate_padded_format():
    exs = [make_example(0, 5, [2]), make_example(1, 9, []), make_example(2, 3, [3, 2])]
    b = collate_padded(exs, PAD)
    T = max(e.input_ids.numel() for e in exs)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, T)
    assert "segment_ids" not in b
    for row, ex in enumerate(exs):
        n = ex.input_ids.numel()
        assert b["input_ids"][row, :n].tolist() == ex.input_ids.tolist()
        assert (b["input_ids"][row, n:] == PAD).all() and (b["labels"][row, n:] == IGNORE_INDEX).all()
        assert b["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
        assert b["labels"][row, 0] == IGNORE_INDEX
        assert b["labels"][row, 1:n].tolist() == ex.labels[1:].tolist()
    # placeholder order: row-major, then left to right
    assert [im.shape[-1] for im in b["images"]] == [16, 24, 16]
    assert [float(im[0, 0, 0]) for im in b["images"]] == [0.0, 2.0, 2.0]
    assert collate_padded(exs, PAD, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0


def test_pack_lengths_first_fit_decreasing():
    bins = pack_lengths([7, 5, 4, 3, 2, 1], 10)
    assert bins == [[0, 3], [1, 2, 5], [4]]
    assert sorted(i for b in bins for i in b) == list(range(6))
    with pytest.raises(ValueError, match="max_length"):
        pack_lengths([11], 10)


def test_packing_rows_and_segments_preserve_every_token():
    exs = mixed_examples(40)
    max_len = 200
    rows = pack_examples(exs, max_len)
    assert max(len(r) for r in rows) > 1  # several samples share a row
    assert all(sum(e.spliced_length for e in r) <= max_len for r in rows)
    assert sorted(e.id for r in rows for e in r) == sorted(e.id for e in exs)
    b = collate_packed(rows, PAD)
    seg, ids, labels, mask = b["segment_ids"], b["input_ids"], b["labels"], b["attention_mask"]
    assert seg.shape == ids.shape
    assert torch.equal(mask.bool(), seg > 0)
    for r, row in enumerate(rows):
        pos = 0
        for k, ex in enumerate(row, start=1):
            n = ex.input_ids.numel()
            assert (seg[r, pos:pos + n] == k).all()
            assert ids[r, pos:pos + n].tolist() == ex.input_ids.tolist()
            assert labels[r, pos].item() == IGNORE_INDEX
            assert labels[r, pos + 1:pos + n].tolist() == ex.labels[1:].tolist()
            pos += n
        assert (seg[r, pos:] == 0).all() and (ids[r, pos:] == PAD).all()
        assert (labels[r, pos:] == IGNORE_INDEX).all()
    # packed and padded batches carry exactly the same tokens and supervision
    padded = collate_padded([e for r in rows for e in r], PAD)
    real = padded["attention_mask"].bool()
    assert ids[mask.bool()].tolist() == padded["input_ids"][real].tolist()
    assert labels[mask.bool()].tolist() == padded["labels"][real].tolist()
    assert [im.data_ptr() for im in b["images"]] == [im.data_ptr() for im in padded["images"]]
    assert len(b["images"]) == int((ids == IMAGE_TOKEN_INDEX).sum())


def test_padding_waste_packed_below_padded():
    exs = mixed_examples(64, seed=3)
    max_len = max(e.spliced_length for e in exs)
    padded = [padding_waste([e.spliced_length for e in exs[k:k + 8]]) for k in range(0, 64, 8)]
    rows = pack_examples(exs, max_len)
    packed = padding_waste([sum(e.spliced_length for e in r) for r in rows], max_len)
    assert packed < sum(padded) / len(padded)
    assert len(rows) < len(exs)
    assert padding_waste([10, 10]) == 0.0 and padding_waste([5, 10]) == pytest.approx(0.25)
    assert padding_waste([5, 5], 20) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        padding_waste([30], 20)


def test_streaming_packer_keeps_everything():
    exs = mixed_examples(50)
    rows = list(StreamingPacker(max_length=160, buffer_size=16)(iter(exs)))
    assert sorted(e.id for r in rows for e in r) == sorted(e.id for e in exs)
    assert all(sum(e.spliced_length for e in r) <= 160 for r in rows)


def test_length_grouped_batches_by_modality_and_deterministic():
    lengths = [random.Random(i).randint(1, 500) for i in range(200)]
    modal = [i % 3 != 0 for i in range(200)]
    a = length_grouped_batches(lengths, 8, 64, seed=4, modalities=modal)
    assert a == length_grouped_batches(lengths, 8, 64, seed=4, modalities=modal)
    assert a != length_grouped_batches(lengths, 8, 64, seed=5, modalities=modal)
    assert sorted(i for b in a for i in b) == list(range(200))
    assert all(len({modal[i] for i in b}) == 1 for b in a)
    for b in a:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # grouping reduces padding compared with random batches
    rnd = list(range(200))
    random.Random(0).shuffle(rnd)
    rand_waste = sum(padding_waste([lengths[i] for i in rnd[k:k + 8]]) for k in range(0, 200, 8))
    grouped_waste = sum(padding_waste([lengths[i] for i in b]) for b in a)
    assert grouped_waste < rand_waste / 2


def test_length_grouped_batcher_stream():
    exs = mixed_examples(70)
    batches = list(LengthGroupedBatcher(batch_size=4, megabatch_size=16, seed=0)(iter(exs)))
    assert sorted(e.id for b in batches for e in b) == sorted(e.id for e in exs)
    assert all(len({e.has_image for e in b}) == 1 for b in batches)
    assert all(len(b) <= 4 for b in batches)
    dropped = list(LengthGroupedBatcher(4, 16, seed=0, drop_last=True)(iter(exs)))
    assert all(len(b) == 4 for b in dropped)


def test_iter_batches_modes_and_teacher():
    exs = [make_example(i, 10 + i, [2] if i % 2 else [], teacher=True) for i in range(10)]
    padded = list(iter_batches(exs, BatchConfig(batch_size=4, pad_id=PAD)))
    assert [b["input_ids"].shape[0] for b in padded] == [4, 4, 2]
    assert sum(len(b["images"]) for b in padded) == 5
    b0 = padded[0]
    assert b0["teacher_pixels"].shape == (2, 3, 4, 4) and b0["teacher_masks"].shape == (2, 2, 2)
    assert [float(t[0, 0, 0]) for t in b0["teacher_pixels"]] == [float(im[0, 0, 0]) for im in b0["images"]]
    packed = list(iter_batches(exs, BatchConfig(batch_size=2, pad_id=PAD, pack=True, max_length=40)))
    assert all("segment_ids" in b and b["input_ids"].shape[0] <= 2 for b in packed)
    assert sum(int(b["segment_ids"].amax(1).sum()) for b in packed) == 10
    grouped = list(iter_batches(exs, BatchConfig(batch_size=3, pad_id=PAD, group_by_length=True)))
    assert sum(b["input_ids"].shape[0] for b in grouped) == 10


def test_mixed_teacher_presence_is_an_error():
    exs = [make_example(0, 5, [2], teacher=True), make_example(1, 5, [2])]
    with pytest.raises(ValueError, match="teacher"):
        collate_padded(exs, PAD)


def test_branch_ids_travel_through_padded_and_packed_batches():
    plain = make_example(1, 6, [2])
    branched = make_example(2, 9, [3])
    branched.branch_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    padded = collate_padded([plain, branched], PAD)
    assert padded["branch_ids"].tolist() == [[0] * 10, branched.branch_ids.tolist()]
    assert "branch_ids" not in collate_padded([plain], PAD)  # plain batches stay as they were
    packed = collate_packed([[plain, branched]], PAD)
    assert packed["branch_ids"].tolist() == [[0] * 7 + branched.branch_ids.tolist()]
    assert packed["segment_ids"].tolist() == [[1] * 7 + [2] * 10]


def _branched(i: int, pixel: float, prefix: list[int], extra: int = 0) -> Example:
    """[IMG, *prefix] shared, then one branch of 3 + `extra` tokens; the image is 5 visual tokens."""
    own = [10 + i, *[40 + i] * extra, 20 + i, 30 + i]
    ids = torch.tensor([IMAGE_TOKEN_INDEX, *prefix, *own])
    labels = torch.tensor([IGNORE_INDEX] * (len(prefix) + len(own) - 1) + [20 + i, 30 + i])
    return Example(ids, labels, [torch.full((3, 16, 16), pixel)], [5], index=i, id=f"b{i}",
                   branch_ids=torch.tensor([0] * (len(prefix) + 1) + [1] * len(own)))


def test_identical_prefixes_share_one_row_and_others_do_not():
    same = [_branched(0, 1.0, [7, 8]), _branched(1, 1.0, [7, 8]), _branched(2, 1.0, [7, 8])]
    longest = _branched(3, 2.0, [7, 8], extra=7)  # 7 prefix + 10 own tokens: room for all three
    batch = collate_padded([*same, longest, _branched(4, 1.0, [7, 9])], PAD)
    assert batch["input_ids"].shape[0] == 3 and len(batch["images"]) == 3  # the three blanks share a row
    row = batch["input_ids"][0].tolist()
    assert row[:12] == [IMAGE_TOKEN_INDEX, 7, 8, 10, 20, 30, 11, 21, 31, 12, 22, 32]
    assert batch["branch_ids"][0].tolist()[:12] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch["labels"][0].tolist()[:12] == [IGNORE_INDEX] * 4 + [20, 30, IGNORE_INDEX, 21, 31, IGNORE_INDEX, 22, 32]
    assert batch["input_ids"].shape[1] == longest.input_ids.numel()  # merging did not lengthen the batch


def test_shared_prefixes_merge_only_up_to_the_longest_row():
    # Rows of 10 tokens (7 of them the shared prefix): two share a row only when a 13-token row exists.
    same = [_branched(i, 1.0, [7, 8]) for i in range(4)]
    alone = collate_padded(same, PAD)
    assert alone["input_ids"].shape == (4, 6)  # merging any two would make a 13-token row
    with_long = collate_padded([*same, _branched(9, 2.0, [7, 8], extra=3)], PAD)
    assert with_long["input_ids"].shape[0] == 3  # b0+b1, b2+b3, the long one
    assert with_long["branch_ids"][:2, -1].tolist() == [2, 2]
