"""Training: YAML recipes, the one trainer loop, tiny models and generated data for CPU runs."""

from .recipe import PARAM_GROUPS, Recipe, RecipeError
from .trainer import Trainer, TrainResult, latest_checkpoint, param_group_of, set_trainable, train

__all__ = [
    "PARAM_GROUPS",
    "Recipe",
    "RecipeError",
    "TrainResult",
    "Trainer",
    "latest_checkpoint",
    "param_group_of",
    "set_trainable",
    "train",
]
