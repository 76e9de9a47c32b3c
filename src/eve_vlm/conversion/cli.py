"""`eve convert-llm`: a local Llama/Qwen2 Hugging Face folder -> a fresh EVE model folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-llm",
        help="turn a local Llama/Qwen2 folder into a fresh EVE v1 or v2 model",
        description="Build a fresh EVE model around a local Hugging Face Llama- or Qwen2-family LLM "
        "(new vision layers, the LLM's weights) and save it with its processor.",
    )
    p.add_argument("llm", type=Path, help="Hugging Face folder of a Llama- or Qwen2-family LLM")
    p.add_argument("out", type=Path, help="output folder (model + processor)")
    p.add_argument("--version", choices=["v1", "v2"], default="v2", help="EVE architecture to build")
    p.add_argument(
        "--vision-hidden-size", type=int, default=None, help="vision embedding width (default: the released models')"
    )
    p.add_argument(
        "--resolution", type=int, default=None,
        help="v1 image_size or v2 max_size (default: the released models', v1 672, v2 800)",
    )
    p.add_argument("--template", default=None, help="chat template name (default per version)")
    p.add_argument(
        "--keep-layers", default=None, help="build the decoder from these LLM layers only, e.g. '0-1,28-29'"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the new layers' random initialisation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .llm import check_llm_folder, convert_llm_folder, parse_layers

    check_llm_folder(args.llm)  # before anything else: transformers would read the path as a hub repo id
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"output path is a file, not a folder: {args.out}")
    extra = {"keep_layers": list(parse_layers(args.keep_layers))} if args.keep_layers else {}
    convert_llm_folder(
        args.llm,
        args.out,
        version=args.version,
        vision_hidden_size=args.vision_hidden_size,
        resolution=args.resolution,
        template=args.template,
        seed=args.seed,
        **extra,
    )
    logger.info("wrote %s", args.out)
    return 0
