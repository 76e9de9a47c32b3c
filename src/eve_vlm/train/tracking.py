"""Experiment tracking: each step's metrics into TensorBoard, and W&B when a recipe selects it.

The recipe's `report_to` lists the trackers (`tensorboard`, `wandb`; none by default). They are
callbacks like the metrics log, writing from the main process only, so N processes make one run
in the tracker, not N. The scalars are the ones a long run is watched by: total, LM and aligning
loss, the learning rate of every parameter group, the gradient norm before clipping, tokens/s and
the padding waste of the batches. TensorBoard's files go to `OUTPUT_DIR/tensorboard/`; a resume
purges the steps after its checkpoint there, so the curves show the run that made the weights.
"""

from __future__ import annotations

import importlib.util
import logging
from numbers import Number
from pathlib import Path
from typing import Any

from .callbacks import Trainer, TrainerCallback
from .recipe import REPORT_TO, Recipe, RecipeError

logger = logging.getLogger(__name__)

TRACKERS = REPORT_TO
# record key -> tracker tag; `lr_groups` adds one `lr/<group>` scalar per parameter group
SCALARS = {
    "loss": "train/loss",
    "lm_loss": "train/lm_loss",
    "aligning_loss": "train/aligning_loss",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "padding_waste": "train/padding_waste",
}
# the package each tracker imports, and how to get it
_NEEDS = {
    "tensorboard": ("tensorboard", "pip install 'eve-vlm[track]' (tensorboard)"),
    "wandb": ("wandb", "pip install wandb"),
}


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracked scalars of one step's record, by tag (keys the record lacks are left out)."""
    out = {tag: float(record[key]) for key, tag in SCALARS.items() if isinstance(record.get(key), Number)}
    for group, lr in record.get("lr_groups", {}).items():
        out[f"lr/{group}"] = float(lr)
    return out


def eval_scalars(metrics: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """An evaluation's numeric metrics as `eval/<name>` tags (nested dicts flattened with `/`)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(eval_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, Number) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoardTracker(TrainerCallback):
    """Scalars into TensorBoard event files (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.dist.main:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops events of steps after the checkpoint a resume started from
        step = trainer.state.step
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if step else None)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for tag, value in step_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for tag, value in eval_scalars(metrics).items():
            self.writer.add_scalar(tag, value, trainer.state.step)
        self.writer.flush()

    def on_save(self, trainer: Trainer, path: Path) -> None:
        if self.writer is not None:  # what a checkpoint covers is on disk too
            self.writer.flush()

    def on_train_end(self, trainer: Trainer, result: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker(TrainerCallback):
    """Scalars into a Weights & Biases run named after the recipe, with the recipe as its config.
    The project, entity and mode come from W&B's own settings (WANDB_PROJECT, WANDB_MODE, ...)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.run: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.dist.main:
            return
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(name=trainer.recipe.name, dir=str(self.run_dir), config=trainer.recipe.to_dict(),
                              resume="allow")

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(step_scalars(record), step=record["step"])

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(eval_scalars(metrics), step=trainer.state.step)

    def on_train_end(self, trainer: Trainer, result: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def check_trackers(names: list[str]) -> None:
    """Fail before training when a selected tracker's package is missing."""
    for name in names:
        module, how = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise RecipeError(f"report_to selects {name!r}, but {module} is not installed ({how})")


def tracking_callbacks(recipe: Recipe, output_dir: Path) -> list[TrainerCallback]:
    """The trackers `recipe.report_to` selects, checked to be installed."""
    check_trackers(recipe.report_to)
    make = {"tensorboard": lambda: TensorBoardTracker(output_dir / "tensorboard"),
            "wandb": lambda: WandbTracker(output_dir)}
    return [make[name]() for name in recipe.report_to]
