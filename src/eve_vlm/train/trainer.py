"""One training loop for every EVE stage: it wires together the parts a builder made from a recipe.

Gradient accumulation with the LM loss averaged per supervised token over the whole global batch
(not per micro-batch, so a token weighs the same whichever micro-batch it lands in), clipping,
per-group learning rates, bf16 autocast on GPU / fp32 on CPU, DDP or FSDP2 under torchrun, atomic
distributed checkpoints and an exact resume on any world size (model, optimizer, scheduler, RNG and
data position) that refuses a checkpoint of a different run. Everything
around the loop (progress bar, metrics log, loss plot, periodic checkpoints, a study's re-planning)
is a callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .builder import TrainingParts, build_training
from .callbacks import TrainerCallback, default_callbacks
from .checkpointing import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    write_checkpoint,
)
from .distributed import barrier, clip_gradients, set_gradient_sync
from .export import export_pretrained
from .params import num_targets
from .recipe import Recipe, RecipeError
from .resume_check import recipe_differences
from .state import TrainerState, TrainResult
from .tracking import check_trackers, tracking_callbacks

logger = logging.getLogger(__name__)


class Trainer:
    """Trains `parts` as `recipe` says. `callbacks` come after the default ones (progress bar,
    metrics log, loss plot, periodic checkpoints) and the trackers `recipe.report_to` selects."""

    def __init__(
        self,
        recipe: Recipe,
        parts: TrainingParts,
        *,
        callbacks: Sequence[TrainerCallback] = (),
        progress: bool = True,
    ) -> None:
        self.recipe = recipe
        self.parts = parts
        self.out = Path(recipe.output_dir)
        self.state = TrainerState()
        self.callbacks: list[TrainerCallback] = [
            *default_callbacks(self.out, recipe.save_every, progress), *tracking_callbacks(recipe, self.out), *callbacks
        ]

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        *,
        model: Any = None,
        processor: Any = None,
        callbacks: Sequence[TrainerCallback] = (),
        progress: bool = True,
    ) -> Trainer:
        """Build the parts from the recipe (continuing `model`/`processor` when given) and wire them."""
        check_trackers(recipe.report_to)  # a missing tracker fails before the model is built
        return cls(recipe, build_training(recipe, model=model, processor=processor), callbacks=callbacks, progress=progress)

    # .................................................................. views of the parts
    @property
    def model(self) -> Any:
        return self.parts.model

    @property
    def processor(self) -> Any:
        return self.parts.processor

    @property
    def teacher(self) -> Any:
        return self.parts.teacher

    @property
    def device(self) -> torch.device:
        return self.parts.device

    @property
    def dist(self):  # noqa: ANN201 - DistInfo
        return self.parts.dist

    @property
    def schedule(self):  # noqa: ANN201 - LrSchedule
        """The learning-rate schedule; its `total` is the run's length (a callback may resize it)."""
        return self.parts.schedule

    @property
    def max_steps(self) -> int:
        return self.parts.schedule.total

    @property
    def batches(self):  # noqa: ANN201 - BatchStream
        return self.parts.batches

    # .................................................................. checkpoints
    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically; a crash mid-write never leaves it looking complete."""
        p = self.parts
        target = checkpoint_dir(self.out, self.state.step)
        write_checkpoint(
            target,
            model=p.model,
            optimizer=p.optimizer,
            processor=p.processor,
            scheduler_state=p.scheduler.state_dict(),
            trainer_state=self._trainer_state(),
            info=p.dist,
        )
        if p.dist.main:
            prune_checkpoints(self.out, self.recipe.keep_checkpoints)
        barrier(p.dist)
        for cb in self.callbacks:
            cb.on_save(self, target)
        return target

    def _trainer_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step,
            "micro_batches": self.parts.batches.taken,
            "samples": s.samples,
            "tokens": s.tokens,
            "max_steps": self.max_steps,
            "world_size": self.parts.dist.world,
            "num_workers": self.parts.batches.num_workers,
            "history": s.history,
            "recipe": self.recipe.to_dict(),
        }

    def check_same_run(self, saved: dict[str, Any] | None, where: Path, allow_changes: bool) -> None:
        """Refuse to continue a run whose recipe changed in a field that alters its trajectory
        (learning rate, global batch, length, data, ...) unless `allow_changes`, which is logged."""
        if saved is None:
            return
        diffs = recipe_differences(saved, self.recipe.to_dict())
        if not diffs:
            return
        listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
        if not allow_changes:
            raise RecipeError(
                f"{where} belongs to a run with another recipe ({listing}); resume with the recipe it was "
                "written with, or pass --allow-recipe-change to continue with the changed fields"
            )
        logger.warning("resuming %s with a changed recipe (--allow-recipe-change): %s", where, listing)

    def finished(self, allow_changes: bool = False) -> bool:
        """True when this output folder holds a run of this recipe that already ran to its end."""
        summary, recipe_json = self.out / "summary.json", self.out / "recipe.json"
        if not (summary.is_file() and recipe_json.is_file() and (self.out / "final").is_dir()):
            return False
        self.check_same_run(json.loads(recipe_json.read_text()), self.out / "final", allow_changes)
        return int(json.loads(summary.read_text()).get("steps", 0)) >= self.max_steps

    def resume(self, checkpoint: Path | None = None, allow_changes: bool = False) -> bool:
        """Continue from `checkpoint` (default: the newest complete one); False when there is none.

        The checkpoint may come from another world size: DCP reshards the model and optimizer, and
        the data stream skips the global samples already trained on."""
        ckpt = checkpoint or latest_checkpoint(self.out)
        if ckpt is None:
            logger.info("no checkpoint to resume from in %s: starting fresh", self.out)
            return False
        p = self.parts
        trainer = read_trainer_state(ckpt)
        self.check_same_run(trainer.get("recipe"), ckpt, allow_changes)
        saved_workers = trainer.get("num_workers", 0)
        if saved_workers != p.batches.num_workers:
            raise ValueError(
                f"{ckpt} was written with data.num_workers={saved_workers}; resume with the same number "
                f"(not {p.batches.num_workers}): it decides which records each worker reads"
            )
        training = load_checkpoint(ckpt, model=p.model, optimizer=p.optimizer, info=p.dist)
        planned = dataclasses.replace(p.schedule)
        p.scheduler.load_state_dict(training["scheduler"])  # restores the schedule object's fields too
        p.schedule.__dict__.update(planned.__dict__)  # the recipe being resumed decides the length
        self.state = TrainerState(trainer["step"], trainer["samples"], trainer["tokens"], trainer.get("history", []))
        # every global step trains on the same records whatever the world size (GlobalOrderRecords):
        # on another world size, this rank's share of the steps taken is step x its accumulation
        same_world = trainer.get("world_size", 1) == p.dist.world
        p.batches.skip(trainer["micro_batches"] if same_world else trainer["step"] * p.accum)
        logger.info("resumed from %s at step %d (written by %d processes, now %d)", ckpt, self.state.step,
                    trainer.get("world_size", 1), p.dist.world)
        return True

    # .................................................................. one step
    def forward(self, batch: dict[str, Any]) -> Any:
        """The model's forward on one collated micro-batch (moved to the device, under autocast)."""
        p = self.parts
        dev = p.device
        kwargs: dict[str, Any] = {
            "input_ids": batch["input_ids"].to(dev),
            "attention_mask": batch["attention_mask"].to(dev),
            "labels": batch["labels"].to(dev),
            "images": [im.to(dev) for im in batch.get("images", [])] or None,
            "return_logits": False,
        }
        for key in ("segment_ids", "branch_ids"):
            if key in batch:
                kwargs[key] = batch[key].to(dev)
        if "teacher_pixels" in batch and p.teacher is not None:
            kwargs["teacher_pixels"] = batch["teacher_pixels"].to(dev)
            kwargs["teacher_masks"] = batch["teacher_masks"].to(dev)
        ctx = torch.autocast(dev.type, dtype=p.autocast_dtype) if p.autocast_dtype else contextlib.nullcontext()
        with ctx:
            return p.wrapped(**kwargs)

    def train_step(self) -> dict[str, Any]:
        p = self.parts
        world = p.dist.world
        t0 = time.perf_counter()
        p.wrapped.train()
        micro = [p.batches.next() for _ in range(p.accum)]
        # The LM loss is normalised by the supervised-token count of the whole global batch, known
        # before any forward: image positions are never supervised, so the count follows from the
        # text-level labels.
        counts = torch.tensor([float(num_targets(b["labels"])) for b in micro] + [0.0], device=p.device)
        counts[-1] = counts[:-1].sum()
        if world > 1:
            dist.all_reduce(counts)
        total_tokens = max(counts[-1].item(), 1.0)
        lm_sum = torch.zeros((), device=p.device)
        align_sum = torch.zeros((), device=p.device)
        local_tokens = 0
        align_weight = p.model.aligning_loss_weight
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            no_sync = world > 1 and not last and hasattr(p.wrapped, "no_sync")
            set_gradient_sync(p.wrapped, last)  # FSDP2: reduce-scatter once per step
            with p.wrapped.no_sync() if no_sync else contextlib.nullcontext():
                out = self.forward(batch)
                loss = out.lm_loss_sum * (world / total_tokens)
                if out.aligning_loss is not None:
                    loss = loss + out.aligning_loss * (align_weight / p.accum)
                    align_sum += out.aligning_loss.detach()
                loss.backward()
            lm_sum += out.lm_loss_sum.detach()
            local_tokens += int(out.valid.sum())  # tokens processed (text + visual)
        max_norm = self.recipe.optim.max_grad_norm
        if max_norm and max_norm > 0:
            grad_norm = clip_gradients([q for qs in p.groups.values() for q in qs], max_norm)
        else:
            grad_norm = torch.tensor(0.0)
        lrs = p.scheduler.get_last_lr()
        p.optimizer.step()
        p.scheduler.step()
        p.optimizer.zero_grad(set_to_none=True)
        stats = torch.stack([lm_sum, align_sum, torch.tensor(float(local_tokens), device=p.device)])
        if world > 1:
            dist.all_reduce(stats)
        s = self.state
        s.step += 1
        seconds = time.perf_counter() - t0
        s.samples += sum(int(b["input_ids"].shape[0]) for b in micro) * world
        s.tokens += int(stats[2].item())
        lm_loss = stats[0].item() / total_tokens
        aligning = stats[1].item() / (p.accum * world)
        rec = {
            "step": s.step,
            "loss": lm_loss + aligning * align_weight,
            "lm_loss": lm_loss,
            "lr": lrs[0],
            "lr_groups": {g.get("name", str(i)): lr for i, (g, lr) in enumerate(zip(p.optimizer.param_groups, lrs, strict=True))},
            "grad_norm": float(grad_norm),
            "tokens_per_s": stats[2].item() / seconds,
            "seconds": seconds,
            "samples": s.samples,
            "tokens": s.tokens,
        }
        if p.teacher is not None:
            rec["aligning_loss"] = aligning
        cost = [b["stats"] for b in micro if "stats" in b]  # this rank's (data/batching.py: batch_cost)
        if cost:
            rec["padding_waste"] = 1 - sum(c["tokens"] for c in cost) / max(sum(c["slots"] for c in cost), 1)
            rec["attn_spent_over_needed"] = sum(c["attn_pairs_spent"] for c in cost) / max(sum(c["attn_pairs_needed"] for c in cost), 1)
        return rec

    # .................................................................. the loop
    def report_evaluation(self, metrics: dict[str, Any]) -> None:
        """Hand an evaluation's metrics to the callbacks (logged to metrics.jsonl by default)."""
        for cb in self.callbacks:
            cb.on_evaluate(self, metrics)

    def train(self, resume: bool = False, stop_after: int | None = None, allow_recipe_change: bool = False) -> TrainResult:
        """Run to the schedule's length (or `stop_after` steps, for tests of interruption).

        `resume` continues from the newest complete checkpoint; a run that already finished is
        reported and left as it is. `allow_recipe_change` lets a resume change fields that alter
        the run's trajectory (they are logged)."""
        if resume and self.finished(allow_recipe_change):
            logger.info("%s already finished this recipe (%d steps): nothing to resume", self.out, self.max_steps)
            summary = json.loads((self.out / "summary.json").read_text())
            return TrainResult(self.out, self.out / "final", self.state.history, summary)
        if resume:
            self.resume(allow_changes=allow_recipe_change)
        for cb in self.callbacks:
            cb.on_train_start(self)
        start = time.perf_counter()
        ran = 0
        while self.state.step < self.max_steps:
            rec = self.train_step()
            self.state.history.append(rec)
            ran += 1
            for cb in self.callbacks:
                cb.on_step_end(self, rec)
            if stop_after is not None and ran >= stop_after:
                for cb in self.callbacks:
                    if hasattr(cb, "close"):
                        cb.close()
                return TrainResult(self.out, self.out / "final", self.state.history)
        result = self.finish(time.perf_counter() - start)
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def finish(self, seconds: float) -> TrainResult:
        """Write `final/`, `summary.json` and `recipe.json` (main process)."""
        p = self.parts
        final = self.out / "final"
        skipped, seen = p.batches.skip_counts()
        if p.dist.world > 1:  # every rank read its own share of the records
            shares: list[Any] = [None] * p.dist.world
            dist.all_gather_object(shares, (skipped, seen))
            skipped, seen = {}, 0
            for counts, n in shares:
                seen += n
                for reason, k in counts.items():
                    skipped[reason] = skipped.get(reason, 0) + k
        summary: dict[str, Any] = {}
        export_pretrained(p.model, p.processor, final, p.dist, include_aligning_layer=self.recipe.save_aligning_layer)
        if p.dist.main:
            history = self.state.history
            summary = {
                "recipe": self.recipe.name,
                "steps": self.state.step,
                "samples": self.state.samples,
                "tokens": self.state.tokens,
                "seconds": round(seconds, 2),
                "skipped_records": skipped,
                "records_seen": seen,
                "final_loss": history[-1]["loss"] if history else None,
                "world_size": p.dist.world,
                "device": str(p.device),
            }
            if hasattr(p.teacher, "hits"):  # a CachedTeacher: totals since it was built (earlier stages too)
                summary["teacher_cache"] = {"hits": p.teacher.hits, "misses": p.teacher.misses}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            (self.out / "recipe.json").write_text(json.dumps(self.recipe.to_dict(), indent=2, default=str))
            if skipped:
                logger.warning("skipped %d of %d records read: %s", sum(skipped.values()), seen, skipped)
        barrier(p.dist)
        return TrainResult(self.out, final, self.state.history, summary)


def train(recipe: Recipe, *, resume: bool = False, **kwargs: Any) -> TrainResult:
    """Build a stage from `recipe` and train it (`kwargs` go to `Trainer.from_recipe`)."""
    return Trainer.from_recipe(recipe, **kwargs).train(resume=resume)
