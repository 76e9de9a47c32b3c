"""The study's settings: which models, which budgets, which data fractions.

Why budgets are constants: a comparison is only reproducible if every model gets the same,
known budget whatever the machine does that day. The FLOPs budget is a number of training FLOPs;
the wall budget is a number of training seconds. Both are set so that the default grid fits 20
minutes and the full grid 60 minutes on the 2-core reference CPU (docs/compare.md, "Budgets").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("eve_v1", "eve_v2", "encoder")
BUDGETS = ("flops", "wall")
QUESTION_TYPES = ("color", "shape", "yes_no")

# Training throughput on the reference 2-core CPU (fp32), in FLOPs per second as the study counts
# them (compare/flops.py): the quickstart's reference step times at this count, stage 1 (EVE v1, 32
# captions, LLM frozen, teacher) 6.72e10 FLOPs in 0.60 s and stage 2 (everything but the embedding
# trains) 9.01e10 FLOPs in 0.80 s, are 1.12e11 and 1.13e11 FLOPs/s. The FLOPs budget is this speed
# times the wall budget, so that at the reference speed a run reaches its FLOPs budget about when
# its wall budget runs out.
REFERENCE_TRAIN_FLOPS_PER_SECOND = 1.1e11


@dataclass(frozen=True)
class Grid:
    """One grid of runs: every model at every data fraction, under both budgets."""

    data_fractions: tuple[float, ...]
    wall_seconds: float  # training seconds per run (evaluation excluded)
    flops: float  # training FLOPs per run
    curve_points: int = 4  # evaluations at equal steps of the FLOPs budget (and one at each budget's end)
    eval_questions: int = 400  # held-out questions per evaluation (the same ones for every model)

    def __post_init__(self) -> None:
        if not self.data_fractions or any(not 0.0 < f <= 1.0 for f in self.data_fractions):
            raise ValueError(f"data fractions must be in (0, 1], got {self.data_fractions}")
        if self.wall_seconds <= 0 or self.flops <= 0:
            raise ValueError(f"budgets must be > 0, got {self.wall_seconds} s and {self.flops} FLOPs")
        if self.curve_points < 1 or self.eval_questions < 1:
            raise ValueError(f"curve_points and eval_questions must be >= 1, got {self.curve_points}, {self.eval_questions}")


def reference_grid(data_fractions: tuple[float, ...], wall_seconds: float) -> Grid:
    return Grid(data_fractions, wall_seconds, REFERENCE_TRAIN_FLOPS_PER_SECOND * wall_seconds)


# Default: 3 models x (240 s of training + ~30 s of evaluation + ~30 s to build and save a model)
# plus ~1 minute of set-up: ~16 minutes at the reference speed. Full: 9 such runs of 270 s: ~52 minutes.
DEFAULT_GRID = reference_grid((0.25,), 240.0)
FULL_GRID = reference_grid((0.25, 0.5, 1.0), 270.0)


@dataclass
class CompareConfig:
    """One `eve compare` invocation."""

    out: Path = Path("runs/compare")
    seed: int = 0
    full: bool = False
    models: tuple[str, ...] = MODELS
    grid: Grid | None = None  # None: DEFAULT_GRID, or FULL_GRID with `full`
    # Share of the FLOPs budget spent aligning the vision side on captions with the LLM frozen (the
    # EVE / LLaVA pre-alignment stage); the rest is supervised fine-tuning on the questions.
    align_fraction: float = 0.25
    # At most this many questions about one image per training row, trained as independent
    # single-turn samples sharing the image prefix (as the quickstart's stage 3).
    questions_per_sample: int = 16
    keep_layers: tuple[int, ...] = (0, 1, 28, 29)  # SmolLM2 layers kept, as the quickstart
    vision_hidden_size: int = 256
    batch_size: int = 32  # rows per step in alignment (captions)
    sft_batch_size: int = 4  # rows per step in fine-tuning (each up to `questions_per_sample` questions)
    sft_warmup_steps: int = 20
    align_lr: float = 1e-3
    sft_lr: float = 3e-4
    # v1's patch aligning layer teacher in alignment (recipe `teacher` section); {"kind": "none"}: none
    v1_teacher: dict[str, Any] = field(default_factory=lambda: {"kind": "efficientnet", "image_size": 64, "cache_mb": 64})
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {MODELS}, got {self.models}")
        if not 0.0 < self.align_fraction < 1.0:
            raise ValueError(f"align_fraction must be in (0, 1), got {self.align_fraction}")
        if self.questions_per_sample < 1:
            raise ValueError(f"questions_per_sample must be >= 1, got {self.questions_per_sample}")
        if self.batch_size < 1 or self.sft_batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")

    @property
    def the_grid(self) -> Grid:
        if self.grid is not None:
            return self.grid
        return FULL_GRID if self.full else DEFAULT_GRID
