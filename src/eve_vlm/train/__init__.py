"""Training: YAML recipes (shipped ones by name), a builder that turns a recipe into the parts of a
run, and one trainer loop that callbacks watch and steer."""

from .builder import TrainingParts, build_training
from .callbacks import LossPlot, MetricsLog, PeriodicCheckpoint, ProgressBar, TrainerCallback
from .catalog import resolve_recipe, shipped_recipes
from .checkpointing import latest_checkpoint
from .params import param_group_of, set_trainable
from .recipe import PARAM_GROUPS, Recipe, RecipeError
from .schedule import LrSchedule
from .state import TrainerState, TrainResult
from .trainer import Trainer, train

__all__ = [
    "PARAM_GROUPS",
    "LossPlot",
    "LrSchedule",
    "MetricsLog",
    "PeriodicCheckpoint",
    "ProgressBar",
    "Recipe",
    "RecipeError",
    "TrainResult",
    "Trainer",
    "TrainerCallback",
    "TrainerState",
    "TrainingParts",
    "build_training",
    "latest_checkpoint",
    "param_group_of",
    "resolve_recipe",
    "set_trainable",
    "shipped_recipes",
    "train",
]
