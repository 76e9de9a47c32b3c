"""The whole grid: every data fraction, every model; then compare.json, the plots and report.md."""

from __future__ import annotations

import json
import logging
import platform
import time
from typing import Any

import torch

from .config import CompareConfig
from .data import StudyData, easy_vqa_data, write_records
from .models import ModelFactory, smollm2_factory
from .report import plot_curves, write_report
from .run import run_one

logger = logging.getLogger(__name__)


def run_study(cfg: CompareConfig, *, data: StudyData | None = None, factory: ModelFactory | None = None,
              command: str = "") -> dict[str, Any]:
    """Run the grid of `cfg` and write its outputs under `cfg.out`. `data` and `factory` default to
    easy-VQA and SmolLM2 (tests pass generated shapes and tiny random models)."""
    grid = cfg.the_grid
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = data if data is not None else easy_vqa_data(grid.eval_questions, cfg.seed)
    factory = factory if factory is not None else smollm2_factory(cfg)
    runs: list[dict[str, Any]] = []
    models: dict[str, str] = {}
    for fraction in grid.data_fractions:
        images = data.fraction(fraction)
        tag = f"data-{fraction:g}"
        records = write_records(images, out / tag / "records", cfg.questions_per_sample, cfg.seed)
        logger.info("data fraction %g: %d training images, %d questions", fraction, len(images),
                    sum(len(im.questions) for im in images))
        for kind in cfg.models:
            result = run_one(kind, fraction, records, data, factory, cfg, out / tag / kind)
            for run in result["runs"]:
                run["train_images"] = len(images)
            runs += result["runs"]
            models[f"{kind}@{fraction:g}"] = result["model_folder"]
    summary = {
        "command": command,
        "seed": cfg.seed,
        "grid": {"data_fractions": list(grid.data_fractions), "flops_budget": grid.flops,
                 "wall_budget_seconds": grid.wall_seconds, "curve_points": grid.curve_points,
                 "eval_questions": len(data.test), "train_images": len(data.train)},
        "settings": {"align_fraction": cfg.align_fraction, "questions_per_sample": cfg.questions_per_sample,
                     "batch_size": cfg.batch_size, "sft_batch_size": cfg.sft_batch_size, "align_lr": cfg.align_lr,
                     "sft_lr": cfg.sft_lr, "sft_warmup_steps": cfg.sft_warmup_steps, "v1_teacher": cfg.v1_teacher,
                     "keep_layers": list(cfg.keep_layers), "vision_hidden_size": cfg.vision_hidden_size},
        "runs": runs,
        "models": models,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    plots = plot_curves(runs, out)
    write_report(summary, out, plots)
    return summary
