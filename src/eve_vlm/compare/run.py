"""`eve compare`: train each model on each data fraction to both budgets and evaluate along the way.

One training run per model and data fraction serves both budgets: alignment has the same length
under both (its share of the FLOPs budget), and fine-tuning runs at a constant learning rate after
its warm-up, so stopping it at step N gives exactly the model of a run planned to end at N. The run
goes on until it has reached both its FLOPs budget and its wall budget; the FLOPs-budget result is
the model at the first step whose cumulative FLOPs reach the budget, the wall-budget result the
model at the first step whose cumulative training seconds reach it. Evaluation time is not
training time.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..eval.profile import decode_step_macs, decoder_macs
from ..generate import answer, build_prompts
from ..train import Trainer, TrainerCallback
from .config import QUESTION_TYPES, CompareConfig, Grid
from .data import Question, StudyData
from .flops import FLOPS_PER_MAC, RowShape, StepFlops, mean_row, step_flops, vision_forward_flops
from .models import ModelFactory, stage_recipe

logger = logging.getLogger(__name__)

ANSWER_TOKENS = 2  # an easy-VQA answer is one word, then the end-of-turn token
# A run that reaches its FLOPs budget long before its wall budget (a much faster machine) stops at
# this many times the FLOPs budget; its wall result then says the wall budget was not reached.
MAX_FLOPS_FACTOR = 4.0


def normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def evaluate(model: Any, processor: Any, questions: tuple[Question, ...], batch_size: int) -> dict[str, Any]:
    """Greedy answers to `questions`: accuracy overall and per question type."""
    from PIL import Image

    model.eval()
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with torch.inference_mode():
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            images = [[Image.open(q.image).convert("RGB")] for q in chunk]
            outs = answer(model, processor, [q.text for q in chunk], images, max_new_tokens=4)
            for q, out in zip(chunk, outs, strict=True):
                hits[q.kind][0] += normalize(out) == normalize(q.answer)
                hits[q.kind][1] += 1
    total = sum(h[0] for h in hits.values()), sum(h[1] for h in hits.values())
    return {"accuracy": total[0] / max(total[1], 1),
            "per_type": {k: hits[k][0] / hits[k][1] for k in QUESTION_TYPES if hits[k][1]}}


@dataclass
class Progress:
    """Where a run is: cumulative training FLOPs and seconds, its curve, and its budgets' results."""

    grid: Grid
    flops: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    at_budget: dict[str, dict[str, Any]] = field(default_factory=dict)  # "flops" / "wall" -> curve point
    next_point: int = 1

    @property
    def point_flops(self) -> float:
        return self.grid.flops / self.grid.curve_points

    @property
    def done(self) -> bool:
        return "flops" in self.at_budget and "wall" in self.at_budget


class BudgetCallback(TrainerCallback):
    """Counts each fine-tuning step's FLOPs and seconds, evaluates at the curve points and at each
    budget's end, and lengthens the run one step at a time until both budgets are reached."""

    def __init__(self, progress: Progress, step: StepFlops, evaluate_now: Any) -> None:
        self.progress = progress
        self.step = step
        self.evaluate_now = evaluate_now

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        p = self.progress
        p.flops += self.step.step
        p.seconds += float(record["seconds"])
        p.steps += 1
        check_points(p, self.evaluate_now)
        if p.done:
            return
        step, schedule = trainer.state.step, trainer.schedule
        if step >= schedule.total:
            if p.flops >= MAX_FLOPS_FACTOR * p.grid.flops:
                check_points(p, self.evaluate_now, give_up_wall=True)
                return
            schedule.resize(step + 1, step)


def check_points(p: Progress, evaluate_now: Any, give_up_wall: bool = False) -> None:
    """Evaluate when the run has reached a curve point or a budget's end (once each);
    `give_up_wall`: end the wall budget here although its seconds are not spent."""
    due_point = p.flops >= p.next_point * p.point_flops * (1 - 1e-9)
    due_flops = "flops" not in p.at_budget and p.flops >= p.grid.flops * (1 - 1e-9)
    reached = p.seconds >= p.grid.wall_seconds
    due_wall = "wall" not in p.at_budget and (reached or give_up_wall)
    if not (due_point or due_flops or due_wall):
        return
    if p.curve and p.curve[-1]["steps"] == p.steps:  # already evaluated at this step
        point = p.curve[-1]
    else:
        point = {"train_flops": p.flops, "train_seconds": p.seconds, "steps": p.steps, **evaluate_now()}
        p.curve.append(point)
    while p.flops >= p.next_point * p.point_flops * (1 - 1e-9):
        p.next_point += 1
    if due_flops:
        p.at_budget["flops"] = point
    if due_wall:
        p.at_budget["wall"] = dict(point, wall_budget_reached=reached)


def inference_flops_per_answer(model: Any, processor: Any, question: Question, pixels: torch.Tensor,
                               visual_tokens: int) -> float:
    """Forward FLOPs of answering one question: the vision part, the prefill (LM head at the last
    position) and the decode steps of a one-word answer."""
    from PIL import Image

    image = Image.open(question.image).convert("RGB")
    ids = processor(build_prompts(processor, ["<image>\n" + question.text]), images=[image], return_tensors=None)["input_ids"][0]
    context = visual_tokens + len(ids) - 1
    config = model.config
    prefill = sum(decoder_macs(config, context, 1, attention="causal").values())
    decode = sum(decode_step_macs(config, context + k) for k in range(ANSWER_TOKENS - 1))
    return float(vision_forward_flops(model, pixels)[0] + FLOPS_PER_MAC * (prefill + decode))


def run_one(kind: str, fraction: float, data: dict[str, Path], study: StudyData, factory: ModelFactory,
            cfg: CompareConfig, out: Path) -> dict[str, Any]:
    """Train model `kind` on one data fraction to both budgets; its two result records."""
    from PIL import Image

    from ..train.builder import build_teacher

    grid = cfg.the_grid
    torch.manual_seed(cfg.seed)
    model, processor = factory(kind)
    sample = study.test[0]
    pixels = processor(images=[Image.open(sample.image).convert("RGB")])["images"][0]
    visual_tokens = processor.num_image_tokens(pixels)

    def evaluate_now() -> dict[str, Any]:
        t = time.perf_counter()
        result = evaluate(model, processor, study.test, cfg.eval_batch_size)
        logger.info("%s (data %.2f): %.1f%% after %.3g FLOPs, %.0f s of training (evaluated in %.0f s)",
                    kind, fraction, 100 * result["accuracy"], progress.flops, progress.seconds, time.perf_counter() - t)
        return result

    progress = Progress(grid)
    rows: dict[str, RowShape] = {
        "align": mean_row(data["captions"], processor, template="plain", independent_turns=False, max_length=128),
        "sft": mean_row(data["qa"], processor, template="chatml", independent_turns=True, max_length=512),
    }
    def recipe_for(stage: str, steps: int) -> Any:
        records = data["captions" if stage == "align" else "qa"]
        return stage_recipe(kind, stage, version=model.config.version, data=records, out=out / stage, steps=steps,
                            seed=cfg.seed, cfg=cfg)

    # alignment: its share of the FLOPs budget, under both budgets
    teacher = build_teacher(recipe_for("align", 1))  # the recipe's teacher, to count its forward
    align = step_flops(model, pixels, visual_tokens, rows["align"], cfg.batch_size, vision_trains=True, llm_trains=False,
                       visual_llm_trains=kind == "eve_v2", teacher=teacher)
    align_steps = max(1, math.ceil(cfg.align_fraction * grid.flops / align.step))
    recipe = recipe_for("align", align_steps)
    trainer = Trainer.from_recipe(recipe, model=model, processor=processor, progress=False)
    result = trainer.train()
    model = trainer.model
    if model.model.vision_tower_compressor is not None:
        model.detach_aligning_layer()  # training only
    progress.flops = align_steps * align.step
    progress.seconds = sum(float(h["seconds"]) for h in result.history)
    progress.steps = align_steps
    shutil.rmtree(out / "align" / "final", ignore_errors=True)  # only the fine-tuned model is kept
    check_points(progress, evaluate_now)

    # fine-tuning: constant learning rate, stopped once both budgets are reached
    sft = step_flops(model, pixels, visual_tokens, rows["sft"], cfg.sft_batch_size, vision_trains=True, llm_trains=True)
    sft_steps = max(1, math.ceil(max(grid.flops - progress.flops, 0.0) / sft.step))
    if not progress.done:
        recipe = recipe_for("sft", sft_steps)
        callback = BudgetCallback(progress, sft, evaluate_now)
        trainer = Trainer.from_recipe(recipe, model=model, processor=processor, callbacks=[callback], progress=False)
        trainer.train()
        model = trainer.model

    cost = {"align_step": align.step, "sft_step": sft.step, "align_row_parts": align.per_row, "sft_row_parts": sft.per_row,
            "align_steps": align_steps, "visual_tokens": visual_tokens,
            "rows": {k: {"text_tokens": v.text_tokens, "targets": v.targets} for k, v in rows.items()}}
    infer = inference_flops_per_answer(model, processor, sample, pixels, visual_tokens)
    runs = []
    for budget in ("flops", "wall"):
        end = progress.at_budget[budget]
        limit = ("train_flops", end["train_flops"]) if budget == "flops" else ("train_seconds", end["train_seconds"])
        curve = [{"train_flops": c["train_flops"], "train_seconds": c["train_seconds"], "accuracy": c["accuracy"],
                  "per_type": c["per_type"], "steps": c["steps"]}
                 for c in progress.curve if c[limit[0]] <= limit[1]]
        runs.append({
            "model": kind, "budget": budget, "data_fraction": fraction,
            "train_flops": end["train_flops"], "train_seconds": end["train_seconds"], "steps": end["steps"],
            "accuracy": end["accuracy"], "per_type": end["per_type"],
            "inference_flops_per_answer": infer, "curve": curve,
            **({"wall_budget_reached": end["wall_budget_reached"]} if budget == "wall" else {}),
            "cost": cost,
        })
    return {"runs": runs, "model_folder": str(out / "sft" / "final")}
