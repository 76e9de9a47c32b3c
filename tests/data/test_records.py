"""Record readers (JSON, JSONL, tar shards) and record -> Example encoding with skip accounting."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.data import (
    BatchConfig,
    DataConfig,
    EveDataset,
    JsonRecords,
    ReaderConfig,
    SkipRecord,
    Split,
    TarRecords,
    TooManyBrokenRecords,
    encode_record,
    expand_shards,
    iter_batches,
    open_records,
    truncate,
)
from eve_vlm.data.order import shuffle_buffer
from eve_vlm.data.records import Record

torch.set_num_threads(1)

WORDS = ("a chat between curious user and an artificial intelligence assistant the gives helpful "
         "detailed polite answers to s questions USER ASSISTANT : what is this red square blue "
         "circle green it picture of shows").split()


# --------------------------------------------------------------------------------------------
# fixtures


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "</s>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS + list("'.,?!\n")))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["</s>"]})
    return fast


@pytest.fixture(scope="module")
def processor():
    from eve_vlm.processing import EveProcessor
    from eve_vlm.processing.images import EveImageConfig, EveImageProcessor

    cfg = EveImageConfig(version="v2", max_size=32, patch_stride=4, dense_stride=2)  # 8 px per token
    return EveProcessor(EveImageProcessor(cfg), make_tokenizer(), "qwen2")


def save_png(path: Path, size=(32, 32), color=(200, 30, 30)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(size=(16, 16), color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def conv(i: int, image: str | None = "img.png", answer: str = "it is a red square") -> dict:
    rec = {"id": f"r{i}", "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + "what is this ?"},
        {"from": "gpt", "value": answer}]}
    if image:
        rec["image"] = image
    return rec


def write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def ids_of(records) -> list[str]:
    return [r.id for r in records]


def add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(root: Path, n_shards: int, per_shard: int) -> str:
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tf:
            for k in range(per_shard):
                key = f"s{s}_{k:03d}"
                add_file(tf, f"{key}.png", png_bytes(color=(s * 40, k * 5, 0)))
                if k % 2:
                    add_file(tf, f"{key}.txt", f"a red square {k}".encode())
                else:
                    add_file(tf, f"{key}.json", json.dumps(conv(k)).encode())
    return str(root / f"shard-{{000..{n_shards - 1:03d}}}.tar")


# --------------------------------------------------------------------------------------------
# readers


def test_json_list_parses_records_and_resolves_images(tmp_path):
    objs = [conv(0), conv(1, image=None), {"id": "c", "image": ["x.png", "/abs/y.png"], "caption": "hi"}]
    (tmp_path / "m.json").write_text(json.dumps(objs))
    recs = list(JsonRecords(str(tmp_path / "m.json"), ReaderConfig(shuffle=False)))
    assert ids_of(recs) == ["r0", "r1", "c"]
    assert recs[0].images == [str(tmp_path / "img.png")]
    assert recs[0].messages[0] == {"role": "user", "content": "<image>\nwhat is this ?"}
    assert recs[0].messages[1]["role"] == "assistant"
    assert recs[1].images == [] and not recs[1].has_image
    assert recs[2].caption == "hi" and recs[2].images == [str(tmp_path / "x.png"), "/abs/y.png"]


def test_order_is_deterministic_per_seed_and_epoch(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([conv(i) for i in range(50)]))
    a = ids_of(JsonRecords(str(path), ReaderConfig(seed=1)).iter(epoch=0))
    assert a == ids_of(JsonRecords(str(path), ReaderConfig(seed=1)).iter(epoch=0))
    assert a != ids_of(JsonRecords(str(path), ReaderConfig(seed=2)).iter(epoch=0))
    assert a != ids_of(JsonRecords(str(path), ReaderConfig(seed=1)).iter(epoch=1))
    assert sorted(a) == sorted(f"r{i}" for i in range(50))


def test_jsonl_streams_with_bounded_buffer(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [conv(i) for i in range(200)])
    reader = JsonRecords(str(path), ReaderConfig(seed=0, shuffle_buffer=4))
    assert reader.is_jsonl
    out = ids_of(reader)
    assert sorted(out) == sorted(f"r{i}" for i in range(200)) and out != [f"r{i}" for i in range(200)]
    # a 4-slot buffer can only emit one of the first 5 lines first: the file is streamed
    assert int(out[0][1:]) < 5
    assert all(int(rid[1:]) < k + 5 for k, rid in enumerate(out))


def test_shuffle_buffer_is_permutation():
    import random

    items = list(range(100))
    out = list(shuffle_buffer(iter(items), 10, random.Random(0)))
    assert sorted(out) == items and out != items


def test_bad_jsonl_lines_become_error_records(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [conv(0), "{not json", json.dumps([1, 2]), conv(3)])
    recs = list(JsonRecords(str(path), ReaderConfig(shuffle=False)))
    assert [r.error for r in recs] == [None, "bad_json", "bad_record", None]


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_two_ranks_cover_every_record_exactly_once(tmp_path, kind):
    objs = [conv(i) for i in range(37)]
    if kind == "json":
        path = tmp_path / "m.json"
        path.write_text(json.dumps(objs))
    else:
        path = write_jsonl(tmp_path / "m.jsonl", objs)
    reader = open_records(str(path), ReaderConfig(seed=3, shuffle_buffer=8))
    r0 = ids_of(reader.iter(split=Split(0, 2)))
    r1 = ids_of(reader.iter(split=Split(1, 2)))
    assert abs(len(r0) - len(r1)) <= 1
    assert sorted(r0 + r1) == sorted(o["id"] for o in objs)


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_resume_skips_exactly_the_consumed_samples(tmp_path, kind):
    objs = [conv(i) for i in range(40)]
    path = tmp_path / ("m." + kind)
    if kind == "json":
        path.write_text(json.dumps(objs))
    else:
        write_jsonl(path, objs)
    reader = open_records(str(path), ReaderConfig(seed=5, shuffle_buffer=6))
    full = ids_of(reader.iter(epoch=2))
    assert ids_of(reader.iter(epoch=2, position=13)) == full[13:]
    # two ranks, each consumed 6 samples (position 12 in all): the rest is seen exactly once
    splits = [Split(0, 2), Split(1, 2)]
    done = [ids_of(reader.iter(epoch=2, split=s))[:6] for s in splits]
    rest = [ids_of(reader.iter(epoch=2, split=s, position=12)) for s in splits]
    assert sorted(sum(done, []) + sum(rest, [])) == sorted(full)
    assert not set(sum(done, [])) & set(sum(rest, []))


def test_split_of_ranks_and_workers():
    splits = [Split.of(r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(s.index for s in splits) == list(range(6)) and {s.count for s in splits} == {6}
    assert Split(1, 4).skip_for(10) == len([1, 5, 9])
    with pytest.raises(ValueError):
        Split(2, 2)


def test_expand_shards_brace_and_glob(tmp_path):
    pattern = make_shards(tmp_path, 3, 2)
    assert [Path(p).name for p in expand_shards(pattern)] == [f"shard-{i:03d}.tar" for i in range(3)]
    assert expand_shards(str(tmp_path / "shard-*.tar")) == expand_shards(pattern)
    assert len(expand_shards(str(tmp_path / "shard-{000,002}.tar"))) == 2
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "nope-{0..3}.tar"))


def test_tar_records_captions_and_conversations(tmp_path):
    pattern = make_shards(tmp_path, 2, 4)
    recs = list(TarRecords(pattern, ReaderConfig(shuffle=False)))
    assert len(recs) == 8 and all(r.error is None for r in recs)
    by_id = {r.id: r for r in recs}
    cap, chat = by_id["s0_001"], by_id["s0_000"]
    assert cap.caption == "a red square 1" and cap.messages is None
    assert chat.messages is not None and chat.messages[1]["content"] == "it is a red square"
    img = Image.open(io.BytesIO(cap.open_image(0)))
    assert img.size == (16, 16) and img.convert("RGB").getpixel((0, 0)) == (0, 5, 0)


@pytest.mark.parametrize("n_shards", [4, 1])  # split by shard, and by sample when shards < splits
def test_tar_two_ranks_cover_all_and_resume(tmp_path, n_shards):
    pattern = make_shards(tmp_path, n_shards, 12 // n_shards * 2)
    reader = TarRecords(pattern, ReaderConfig(seed=1, shuffle_buffer=5))
    everything = ids_of(reader.iter())
    r0, r1 = (ids_of(reader.iter(split=Split(i, 2))) for i in range(2))
    assert sorted(r0 + r1) == sorted(everything) and len(set(everything)) == len(everything)
    assert ids_of(reader.iter(split=Split(1, 2), position=7)) == r1[3:]


def test_tar_broken_samples_flagged(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        add_file(tf, "a.png", png_bytes())
        add_file(tf, "a.json", b"{oops")
        add_file(tf, "b.txt", b"caption without image")
        add_file(tf, "c.png", png_bytes())
    recs = list(TarRecords(str(tmp_path / "bad.tar"), ReaderConfig(shuffle=False)))
    assert [(r.id, r.error) for r in recs] == [("a", "bad_json"), ("b", "missing_image"),
                                              ("c", "bad_record")]


# --------------------------------------------------------------------------------------------
# encoding, skipping, truncation


def test_encode_conversation_and_caption(tmp_path, processor):
    save_png(tmp_path / "img.png", (32, 16))
    r = Record("x", images=[str(tmp_path / "img.png")],
               messages=[{"role": "user", "content": "<image>\nwhat is this ?"},
                         {"role": "assistant", "content": "a red square"}])
    ex = encode_record(r, processor, DataConfig(max_length=512))
    assert int((ex.input_ids == IMAGE_TOKEN_INDEX).sum()) == 1 and len(ex.images) == 1
    tokens = processor.num_image_tokens(ex.images[0])
    assert ex.image_tokens == [tokens]
    assert ex.spliced_length == ex.input_ids.numel() - 1 + tokens
    assert ex.num_supervised > 0 and ex.labels[ex.input_ids == IMAGE_TOKEN_INDEX].eq(IGNORE_INDEX).all()
    cap = encode_record(Record("c", images=[str(tmp_path / "img.png")], caption=" a red square "),
                        processor, DataConfig())
    assert cap.input_ids[0] == IMAGE_TOKEN_INDEX and cap.labels[0] == IGNORE_INDEX
    text_only = encode_record(Record("t", caption="a red square"), processor, DataConfig())
    assert not text_only.images and bool((text_only.labels != IGNORE_INDEX).all())


def broken_corpus(tmp_path: Path) -> Path:
    save_png(tmp_path / "img.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    lines = [
        conv(0),
        "{bad json",
        json.dumps({"id": "nofields"}),
        conv(3, image="missing.png"),
        conv(4, image="corrupt.png"),
        {"id": "noans", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
        {"id": "mismatch", "image": "img.png", "conversations": [
            {"from": "human", "value": "what ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "empty", "image": "img.png", "caption": "   "},
        conv(8, image=None),
    ]
    return write_jsonl(tmp_path / "m.jsonl", lines)


def test_broken_records_of_each_kind_are_skipped_and_counted(tmp_path, processor):
    path = broken_corpus(tmp_path)
    ds = EveDataset(JsonRecords(str(path), ReaderConfig(shuffle=False)), processor,
                    DataConfig(max_length=512, max_broken_fraction=1.0))
    examples = list(ds)
    assert [e.id for e in examples] == ["r0", "r8"]
    assert ds.stats.counts == {"bad_json": 1, "bad_record": 1, "missing_image": 1, "corrupt_image": 1,
                               "no_assistant_turn": 1, "placeholder_mismatch": 1, "empty_caption": 1}
    assert ds.stats.total_seen == 9
    assert ds.stats.fraction == pytest.approx(7 / 9)
    assert "missing_image=1" in ds.stats.summary()


def test_too_many_broken_records_raises_after_minimum(tmp_path, processor):
    save_png(tmp_path / "img.png")
    lines = [conv(i) if i % 3 else "{bad" for i in range(60)]  # one in three broken
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    cfg = DataConfig(max_broken_fraction=0.1, min_records_for_check=30)
    ds = EveDataset(JsonRecords(str(path), ReaderConfig(shuffle=False)), processor, cfg)
    with pytest.raises(TooManyBrokenRecords, match="bad_json"):
        list(ds)
    assert 30 <= ds.stats.total_seen < 60
    # under the minimum nothing is raised, however bad the start is
    lenient = EveDataset(JsonRecords(str(path), ReaderConfig(shuffle=False)), processor,
                         DataConfig(max_broken_fraction=0.1, min_records_for_check=1000))
    assert len(list(lenient)) == 40


def test_truncate_never_cuts_inside_an_image():
    img, G = IMAGE_TOKEN_INDEX, IGNORE_INDEX
    ids = torch.tensor([5, img, 6, 7, img, 8, 9])
    labels = torch.tensor([G, G, 6, 7, G, 8, 9])
    # costs 1, 10, 1, 1, 10, 1, 1 -> cumsum 1, 11, 12, 13, 23, 24, 25
    for max_len, n_keep, n_img in [(25, 7, 2), (24, 6, 2), (22, 4, 1), (13, 4, 1), (12, 3, 1),
                                   (10, 1, 0), (1, 1, 0)]:
        out_ids, out_labels, kept = truncate(ids, labels, [10, 10], max_len)
        assert out_ids.tolist() == ids[:n_keep].tolist() and out_labels.tolist() == labels[:n_keep].tolist()
        assert kept == n_img
        assert out_ids.numel() - kept + 10 * kept <= max_len


def test_truncation_drops_images_and_skips_unsupervised(tmp_path, processor):
    save_png(tmp_path / "a.png", (32, 32))  # 1 + 4 * 5 = 21 tokens
    r = Record("two", images=[str(tmp_path / "a.png")] * 2, messages=[
        {"role": "user", "content": "<image>\nwhat is this ?"},
        {"role": "assistant", "content": "a red square"},
        {"role": "user", "content": "<image>\nand this ?"},
        {"role": "assistant", "content": "a blue circle"}])
    full = encode_record(r, processor, DataConfig(max_length=4096))
    assert len(full.images) == 2 and full.image_tokens == [21, 21]
    second = int((full.input_ids == IMAGE_TOKEN_INDEX).nonzero()[1])
    budget = full.spliced_length - (full.input_ids.numel() - second) - 5  # cut inside 2nd image
    cut = encode_record(r, processor, DataConfig(max_length=budget))
    assert len(cut.images) == 1 and cut.image_tokens == [21]
    assert cut.input_ids.tolist() == full.input_ids[:second].tolist()
    assert cut.labels.tolist() == full.labels[:second].tolist()
    assert cut.spliced_length <= budget
    with pytest.raises(SkipRecord) as err:  # only the system prompt fits: nothing to learn
        encode_record(r, processor, DataConfig(max_length=10))
    assert err.value.reason == "no_supervised_tokens_after_truncation"


def test_truncation_skip_is_counted_not_broken(tmp_path, processor):
    save_png(tmp_path / "img.png")
    path = write_jsonl(tmp_path / "m.jsonl", [conv(i) for i in range(5)])
    ds = EveDataset(JsonRecords(str(path)), processor, DataConfig(max_length=8, max_broken_fraction=0.0,
                                                                  min_records_for_check=1))
    assert list(ds) == []
    assert ds.stats.counts == {"no_supervised_tokens_after_truncation": 5} and ds.stats.fraction == 0.0


def test_dataset_with_teacher_and_tar_end_to_end(tmp_path, processor):
    pattern = make_shards(tmp_path, 2, 6)
    calls = []

    def teacher(img):
        calls.append(img.size)
        return torch.zeros(3, 8, 8), torch.ones(2, 2, dtype=torch.bool)

    ds = EveDataset(TarRecords(pattern), processor, DataConfig(max_length=512), teacher_fn=teacher,
                    rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    examples = list(loader)
    assert len(examples) == 12 and len(calls) == 12 and ds.stats.counts == {}
    batches = list(iter_batches(examples, BatchConfig(batch_size=4, pad_id=processor.pad_token_id,
                                                      pack=True, max_length=200)))
    n_img = sum(len(b["images"]) for b in batches)
    assert n_img == 12 and sum(b["teacher_pixels"].shape[0] for b in batches) == 12
    assert all(b["teacher_masks"].shape[1:] == (2, 2) for b in batches)


def test_dataset_splits_over_ranks(tmp_path, processor):
    save_png(tmp_path / "img.png")
    path = write_jsonl(tmp_path / "m.jsonl", [conv(i) for i in range(10)])
    got = [[e.id for e in EveDataset(JsonRecords(str(path)), processor, rank=r, world_size=2)]
           for r in range(2)]
    assert sorted(got[0] + got[1]) == sorted(f"r{i}" for i in range(10)) and len(got[0]) == 5


def test_dataloader_workers_split_and_batch_in_workers(tmp_path, processor):
    from eve_vlm.data import EveBatches

    save_png(tmp_path / "img.png")
    path = write_jsonl(tmp_path / "m.jsonl", [conv(i) for i in range(12)])
    ds = EveDataset(JsonRecords(str(path)), processor, DataConfig(max_length=256), rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                         collate_fn=lambda ex: ex)
    assert sorted(e.id for e in loader) == sorted(f"r{i}" for i in range(12))
    batches = EveBatches(ds, BatchConfig(batch_size=2, pad_id=processor.pad_token_id, pack=True,
                                         max_length=256))
    out = list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2))
    assert sum(int(b["segment_ids"].amax(1).sum()) for b in out) == 12
    assert sum(len(b["images"]) for b in out) == 12


def _batch_ids(batches) -> list[list[int]]:
    return [b["input_ids"].tolist() for b in batches]


def test_worker_batches_replay_exactly_and_report_their_skips(tmp_path, processor):
    """What a trainer with DataLoader workers needs: the same stream on every pass (so a resume can
    skip the batches already taken), round-robin over the workers, and skip counts in the main process."""
    from eve_vlm.data import EveBatches, merge_data_stats

    save_png(tmp_path / "img.png")
    records = [conv(i, answer="it is a " + " ".join(["red"] * (i % 5)) + " square") for i in range(14)]
    records[3]["image"] = records[9]["image"] = "missing.png"
    path = write_jsonl(tmp_path / "m.jsonl", [*records, "{not json"])
    cfg = BatchConfig(batch_size=2, pad_id=processor.pad_token_id, seed=4)

    def loader(workers: int) -> list[dict]:
        ds = EveDataset(JsonRecords(str(path), ReaderConfig(seed=1, shuffle_buffer=4)), processor,
                        DataConfig(max_length=256, max_broken_fraction=0.5), rank=0, world_size=1)
        batches = EveBatches(ds, cfg)
        batches.set_epoch(2)
        return list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers))

    first, again = loader(2), loader(2)
    assert _batch_ids(first) == _batch_ids(again)  # a replay (resume) sees the very same batches
    assert [b["data_stats"]["split"] for b in first[:6]] == [0, 1, 0, 1, 0, 1]  # round-robin
    skipped, seen = merge_data_stats(b["data_stats"] for b in first)
    assert seen == 15 and sum(skipped.values()) == 3 and skipped.get("bad_json") == 1
    assert sum(len(b["images"]) for b in first) == 12  # every good record, once

    single = loader(0)  # no workers: iter_batches over the dataset, seed + epoch
    assert merge_data_stats(b["data_stats"] for b in single) == (skipped, seen)
    ds = EveDataset(JsonRecords(str(path), ReaderConfig(seed=1, shuffle_buffer=4)), processor,
                    DataConfig(max_length=256, max_broken_fraction=0.5), rank=0, world_size=1)
    ds.set_epoch(2)
    assert _batch_ids(single) == _batch_ids(iter_batches(iter(ds), replace(cfg, seed=6)))
