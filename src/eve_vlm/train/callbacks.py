"""Callbacks: how anything outside the training loop watches or steers it.

The protocol is the one users know from transformers' `TrainerCallback` and Lightning: override
any hook, pass the object in `Trainer(..., callbacks=[...])`. Every hook receives the trainer, so
it can read `trainer.state`, `trainer.recipe`, `trainer.model` or `trainer.schedule`. The built-in
progress bar, metrics log, loss plot and periodic checkpoints are callbacks of this kind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from .recipe import Recipe
from .state import TrainerState, TrainResult

logger = logging.getLogger(__name__)


class Trainer(Protocol):
    """What a callback sees of the trainer (`train.Trainer` is one)."""

    recipe: Recipe
    state: TrainerState

    @property
    def max_steps(self) -> int: ...

    @property
    def dist(self) -> Any: ...  # DistInfo: rank, world, main

    @property
    def schedule(self) -> Any: ...  # LrSchedule: resizable while the learning rate is flat

    @property
    def model(self) -> Any: ...

    def save_checkpoint(self) -> Path: ...


class TrainerCallback:
    """Base class: every hook does nothing. Hooks run on every process; use `trainer.dist.main`
    for work that only one process should do."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume: before the first step still to run)."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After each optimizer step; `record` holds the step's metrics (loss, lr, tokens/s, ...)."""

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """When an evaluation's metrics are reported through `trainer.report_evaluation`."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint folder is complete."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the final model is written (not when a run stops early for a test)."""


class ProgressBar(TrainerCallback):
    """A tqdm bar with the step's total loss (and its parts), learning rate and tokens/s."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.max_steps,
            initial=trainer.state.step,
            desc=trainer.recipe.name,
            disable=not trainer.dist.main,
            dynamic_ncols=True,
        )

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if self.bar.total != trainer.max_steps:  # a callback re-planned the run's length
            self.bar.total = trainer.max_steps
            self.bar.refresh()
        self.bar.update(1)
        shown = {"loss": f"{record['loss']:.4f}"}
        if "aligning_loss" in record:
            shown["lm"] = f"{record['lm_loss']:.4f}"
            shown["align"] = f"{record['aligning_loss']:.4f}"
        shown.update(lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.bar.set_postfix(shown)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLog(TrainerCallback):
    """`OUTPUT_DIR/metrics.jsonl`: one JSON line every `recipe.log_every` steps, and one per evaluation.

    On a resume, lines of steps after the checkpoint are dropped first, so the file always
    describes the run that produced the final weights.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.dist.main or not self.path.is_file():
            return
        step = trainer.state.step
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        every = trainer.recipe.log_every
        if trainer.dist.main and every and record["step"] % every == 0:
            self._write(record)

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.dist.main:
            self._write({"step": trainer.state.step, "eval": metrics})

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class LossPlot(TrainerCallback):
    """`OUTPUT_DIR/loss.png` at the end: the total loss the progress bar shows, its LM and aligning
    parts, and the learning rate. Needs matplotlib (the `plot` extra); skipped with a log line
    without it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if trainer.dist.main:
            plot_history(trainer.state.history, self.path, title=trainer.recipe.name)


class PeriodicCheckpoint(TrainerCallback):
    """A checkpoint every `every` steps (the final step writes `final/` instead)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        step = trainer.state.step
        if self.every and step % self.every == 0 and step < trainer.max_steps:
            trainer.save_checkpoint()


def default_callbacks(output_dir: Path, save_every: int, progress: bool = True) -> list[TrainerCallback]:
    """What every run gets: progress bar (optional), metrics log, loss plot, periodic checkpoints."""
    out: list[TrainerCallback] = [ProgressBar()] if progress else []
    out += [MetricsLog(output_dir / "metrics.jsonl"), LossPlot(output_dir / "loss.png")]
    if save_every:
        out.append(PeriodicCheckpoint(save_every))
    return out


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Losses and learning rate against step; False (and a log line) when nothing was drawn."""
    if not history:
        return False
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed (pip install 'eve-vlm[plot]'): no %s", path.name)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(steps, [h["loss"] for h in history], label="total loss")
    if "aligning_loss" in history[0]:
        ax1.plot(steps, [h["lm_loss"] for h in history], label="LM loss", alpha=0.8)
        ax1.plot(steps, [h["aligning_loss"] for h in history], label="aligning loss", alpha=0.8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.set_title(title)
    ax2.plot(steps, [h["lr"] for h in history], color="tab:orange")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
