"""``eve data filter`` and ``eve data dedup``: curation commands (wired into ``eve_vlm.cli``)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict

from .curation import dedup_manifest, default_report_path, filter_manifest, get_embedder

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command with ``filter`` and ``dedup`` subcommands."""
    data = subparsers.add_parser("data", help="curate training manifests")
    sub = data.add_subparsers(dest="data_command", required=True)

    f = sub.add_parser("filter", help="keep records whose images are at least --min-size on both sides")
    f.add_argument("--manifest", required=True, help="input JSON / JSONL manifest")
    f.add_argument("--out", required=True, help="output manifest (.json or .jsonl)")
    f.add_argument("--min-size", type=int, default=448, help="minimum width and height in pixels")
    f.add_argument("--image-root", default=None, help="image folder (default: the manifest's folder)")
    f.add_argument("--report", default=None, help="report JSON (default: OUT stem + .report.json)")
    f.add_argument("--drop-text-only", action="store_true", help="also drop records without images")

    d = sub.add_parser("dedup", help="cluster image embeddings, keep the N nearest to each centre")
    d.add_argument("--manifest", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--clusters", type=int, required=True, help="k-means clusters K")
    d.add_argument("--per-cluster", type=int, required=True, help="records kept per cluster N")
    d.add_argument("--encoder", default="pixels", help="pixels | efficientnet | clip:PATH")
    d.add_argument("--batch-size", type=int, default=64, help="images per embedding batch")
    d.add_argument("--kmeans-batch", type=int, default=4096, help="rows per k-means mini-batch")
    d.add_argument("--iters", type=int, default=100, help="k-means mini-batch steps")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--image-root", default=None)
    d.add_argument("--work-dir", default=None, help="where the embeddings .npy is written")
    d.add_argument("--keep-embeddings", action="store_true")
    d.add_argument("--report", default=None)
    d.add_argument("--drop-text-only", action="store_true")
    data.set_defaults(func=run)
    return data


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``eve data ...`` command; returns the process exit code."""
    try:
        if args.data_command == "filter":
            rep = filter_manifest(args.manifest, args.out, args.min_size, args.image_root,
                                  keep_text_only=not args.drop_text_only, report_path=args.report)
        elif args.data_command == "dedup":
            rep = dedup_manifest(args.manifest, args.out, args.clusters, args.per_cluster,
                                 embed=get_embedder(args.encoder, args.device),
                                 image_root=args.image_root, batch_size=args.batch_size,
                                 work_dir=args.work_dir, seed=args.seed, iters=args.iters,
                                 kmeans_batch=args.kmeans_batch,
                                 keep_text_only=not args.drop_text_only, report_path=args.report,
                                 keep_embeddings=args.keep_embeddings)
        else:
            raise ValueError(f"unknown data command {args.data_command!r}")
    except (OSError, ValueError) as e:
        logger.error("eve data %s: %s", args.data_command, e)
        return 1
    summary = {k: v for k, v in asdict(rep).items() if k != "cluster_sizes"}
    logger.info("eve data %s: %s (report: %s)", args.data_command, json.dumps(summary),
                args.report or default_report_path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m eve_vlm.data.cli filter ...``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="eve")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["data", *(argv if argv is not None else __import__("sys").argv[1:])]))


if __name__ == "__main__":
    raise SystemExit(main())
