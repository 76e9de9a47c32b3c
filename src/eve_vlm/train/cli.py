"""`eve train RECIPE [--set key=value ...] [--resume]` and `eve recipes`."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one training stage from a YAML recipe",
                       description="Run one training stage. RECIPE is a shipped recipe's name (see `eve recipes`) "
                                   "or a path to your own YAML file.")
    p.add_argument("recipe", help="a shipped recipe (e.g. eve_v1/1_prealign, tiny/eve_v2/1_vision) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set output_dir=runs/x --set optim.lr=1e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in output_dir (on any number of processes); "
                        "a finished run is reported and left as it is")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="let --resume continue with recipe fields that change the run (learning rate, global batch, "
                        "max_steps, data, ...); without it such a resume is refused with the list of differences")
    p.set_defaults(func=run)

    from .plan import register as register_plan

    register_plan(sub)

    r = sub.add_parser("recipes", help="list the shipped training recipes",
                       description="The recipes shipped with eve-vlm, usable by name with `eve train NAME`.")
    r.add_argument("--paths", action="store_true", help="also print each recipe's file")
    r.set_defaults(func=list_recipes)


def run(args: argparse.Namespace) -> int:
    from .builder import check_inputs
    from .recipe import Recipe
    from .trainer import Trainer

    recipe = Recipe.load(args.recipe, args.overrides)
    check_inputs(recipe)  # before the model is built or converted
    result = Trainer.from_recipe(recipe).train(resume=args.resume, allow_recipe_change=args.allow_recipe_change)
    if result.summary:
        logger.info("final model: %s  (summary: %s)", result.final_dir, result.output_dir / "summary.json")
    return 0


def list_recipes(args: argparse.Namespace) -> int:
    from .catalog import recipes_root, shipped_recipes
    from .recipe import Recipe

    root = recipes_root()
    for name in shipped_recipes():
        recipe = Recipe.load(name)
        line = f"{name:28s} {recipe.stage or '-':10s} model {recipe.model.version}"
        if args.paths:
            line += f"  {root / name}.yaml"
        sys.stdout.write(line + "\n")
    return 0
