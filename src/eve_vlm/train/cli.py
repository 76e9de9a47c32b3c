"""`eve train RECIPE [--set key=value ...] [--resume]`: run one training stage."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one training stage from a YAML recipe")
    p.add_argument("recipe", help="recipe file, e.g. recipes/eve_v1/1_prealign.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set output_dir=runs/x --set optim.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .recipe import Recipe
    from .trainer import Trainer

    recipe = Recipe.load(args.recipe, args.overrides)
    result = Trainer(recipe).train(resume=args.resume)
    if result.summary:
        logger.info("final model: %s  (summary: %s)", result.final_dir, result.output_dir / "summary.json")
    return 0
