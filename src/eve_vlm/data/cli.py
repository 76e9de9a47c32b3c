"""``eve data filter`` and ``eve data dedup``: curation commands (wired into ``eve_vlm.cli``)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..cli_args import positive_int
from .curation import dedup_manifest, default_report_path, filter_manifest, get_embedder

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command with ``filter`` and ``dedup`` subcommands."""
    data = subparsers.add_parser("data", help="curate training manifests", description="Curate training manifests.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    f = sub.add_parser(
        "filter",
        help="keep records whose images are at least --min-size on both sides",
        description="Keep the records whose images are at least --min-size pixels on both sides.",
    )
    _common_args(f)
    f.add_argument("--min-size", type=positive_int, default=448, help="minimum width and height in pixels")

    d = sub.add_parser(
        "dedup",
        help="cluster image embeddings, keep the N nearest to each centre",
        description="Embed every image, cluster the embeddings with mini-batch k-means into K clusters "
        "and keep the N records nearest to each centre.",
    )
    _common_args(d)
    d.add_argument("--clusters", type=positive_int, required=True, help="k-means clusters K")
    d.add_argument("--per-cluster", type=positive_int, required=True, help="records kept per cluster N")
    d.add_argument("--encoder", default="pixels", help="image embedder: pixels | efficientnet | clip:PATH")
    d.add_argument("--batch-size", type=positive_int, default=64, help="images per embedding batch")
    d.add_argument("--kmeans-batch", type=positive_int, default=4096, help="rows per k-means mini-batch")
    d.add_argument("--iters", type=positive_int, default=100, help="k-means mini-batch steps")
    d.add_argument("--seed", type=int, default=0, help="k-means seed")
    d.add_argument(
        "--device", default="auto", help="embedder device: cpu, cuda, cuda:1, ...; auto: CUDA if available"
    )
    d.add_argument("--work-dir", default=None, help="where the embeddings .npy is written (default: OUT's folder)")
    d.add_argument("--keep-embeddings", action="store_true", help="keep the embeddings .npy after clustering")
    data.set_defaults(func=run)
    return data


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="input JSON / JSONL manifest")
    p.add_argument("--out", required=True, help="output manifest (.json or .jsonl)")
    p.add_argument("--image-root", default=None, help="image folder (default: the manifest's folder)")
    p.add_argument("--report", default=None, help="report JSON (default: OUT stem + .report.json)")
    p.add_argument("--drop-text-only", action="store_true", help="also drop records without images")


def check_inputs(args: argparse.Namespace) -> None:
    """Missing inputs fail in one line before any image is read or an embedder is loaded."""
    if not Path(args.manifest).is_file():
        raise FileNotFoundError(f"manifest not found: {args.manifest}")
    if args.image_root and not Path(args.image_root).is_dir():
        raise FileNotFoundError(f"image folder not found: {args.image_root}")


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``eve data ...`` command; bad input raises (``eve_vlm.cli`` reports it)."""
    check_inputs(args)
    if args.data_command == "filter":
        rep = filter_manifest(args.manifest, args.out, args.min_size, args.image_root,
                              keep_text_only=not args.drop_text_only, report_path=args.report)
    elif args.data_command == "dedup":
        from ..runtime import resolve_device

        device = resolve_device(args.device)
        rep = dedup_manifest(args.manifest, args.out, args.clusters, args.per_cluster,
                             embed=get_embedder(args.encoder, str(device)),
                             image_root=args.image_root, batch_size=args.batch_size,
                             work_dir=args.work_dir, seed=args.seed, iters=args.iters,
                             kmeans_batch=args.kmeans_batch,
                             keep_text_only=not args.drop_text_only, report_path=args.report,
                             keep_embeddings=args.keep_embeddings)
    else:
        raise ValueError(f"unknown data command {args.data_command!r}")
    summary = {k: v for k, v in asdict(rep).items() if k != "cluster_sizes"}
    logger.info("eve data %s: %s (report: %s)", args.data_command, json.dumps(summary),
                args.report or default_report_path(args.out))
    return 0
