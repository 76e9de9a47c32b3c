"""Training FLOPs per step, so that every model of the study can be stopped at the same budget.

Counting, per training row (one image and its text):

* the decoder's forward as the profiler counts a prefill (`eval.profile.decoder_macs`: every matrix
  product, causal attention), over the row's visual and text tokens; the LM head at the supervised
  positions only, as the training forward computes it;
* the vision part's forward (EVE's patch embedding, or the encoder and its projector), and v1's
  frozen teacher, as `torch.utils.flop_counter.FlopCounterMode` counts them on one real image;
* the backward pass: 2x a part's forward for a part that trains (gradients of its activations and
  of its weights), 1x for a frozen part that the gradient passes through (the frozen LLM during
  alignment, the frozen tied embedding used as the LM head), 0x for a frozen part in front of
  everything that trains (a frozen encoder, the teacher).

The rows' text lengths and supervised tokens are the means over the stage's records, encoded as
the trainer encodes them; every model reads the same records with the same tokenizer, so only the
vision side, which is exact, differs between models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..constants import IGNORE_INDEX
from ..data import DataConfig, encode_record, record_from_dict
from ..eval.profile import decoder_macs

FLOPS_PER_MAC = 2


@dataclass(frozen=True)
class RowShape:
    """The mean training row of a stage: text tokens (placeholders excluded) and supervised tokens."""

    text_tokens: float
    targets: float


def mean_row(records: Path, processor: Any, *, template: str, independent_turns: bool, max_length: int,
             limit: int = 512) -> RowShape:
    """The mean row over the first `limit` records of a JSONL manifest, encoded as the trainer does."""
    config = DataConfig(max_length=max_length, template=template, caption_template=template,
                        independent_turns=independent_turns)
    text = targets = n = 0
    with records.open() as f:
        for line in f:
            if n >= limit:
                break
            ex = encode_record(record_from_dict(json.loads(line)), processor, config)
            text += int(ex.input_ids.numel()) - len(ex.images)
            targets += int((ex.labels != IGNORE_INDEX).sum())
            n += 1
    if n == 0:
        raise ValueError(f"{records}: no records to count")
    return RowShape(text / n, targets / n)


def forward_flops(module: nn.Module, *args: Any, part: str | None = None) -> tuple[int, int]:
    """FLOPs of one forward of `module` as torch's FlopCounterMode counts them, and of its
    submodule named `part` (a dotted path below `module`; 0 when None)."""
    with FlopCounterMode(display=False) as counter:  # with autograd on: its module tracker needs it
        module(*args)
    inside = 0
    if part is not None:
        key = f"{type(module).__name__}.{part}"
        counts = counter.get_flop_counts()
        if key not in counts:
            raise ValueError(f"no FLOPs counted in {part!r}; counted: {sorted(counts)[:8]}")
        inside = int(sum(counts[key].values()))
    return int(counter.get_total_flops()), inside


class EncodeImages(nn.Module):
    """The vision part of an EVE model (whatever its kind) as a module: image -> visual tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model.model

    def forward(self, pixels: torch.Tensor) -> Any:
        return self.inner.encode_images([pixels])


def vision_forward_flops(model: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    """FLOPs of the model's whole vision part on one image, and of its frozen encoder (0 if none)."""
    return forward_flops(EncodeImages(model), pixels, part=frozen_vision_part(model))


def frozen_vision_part(model: nn.Module) -> str | None:
    """Where the frozen encoder in front of an encoder-based model's projector sits (below
    `EncodeImages`), or None (EVE models: their whole vision part trains)."""
    config = model.config
    if getattr(config, "vision", "patch") == "encoder" and not config.vision_encoder_trainable:
        return "inner.vision_tower.encoder"
    return None


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs of one step of a stage, and its parts per row (for the report)."""

    per_row: dict[str, float]
    rows_per_step: int

    @property
    def row(self) -> float:
        return float(sum(self.per_row.values()))

    @property
    def step(self) -> float:
        return self.row * self.rows_per_step


def step_flops(model: nn.Module, pixels: torch.Tensor, visual_tokens: int, row: RowShape, rows_per_step: int, *,
               vision_trains: bool, llm_trains: bool, visual_llm_trains: bool | None = None,
               teacher: nn.Module | None = None) -> StepFlops:
    """Training FLOPs of a step of `rows_per_step` mean rows (see the module docstring).

    `visual_llm_trains`: whether the decoder weights the visual tokens pass through train (EVEv2's
    vision copies do while its text weights are frozen); default `llm_trains`.
    A frozen encoder in front of everything that trains (`frozen_vision_part`) counts forward only.
    """
    config = model.config
    vision, frozen = vision_forward_flops(model, pixels)
    n = visual_tokens + row.text_tokens
    macs = decoder_macs(config, max(1, round(n)), 0, attention="causal")
    decoder = FLOPS_PER_MAC * sum(macs.values()) * n / max(1, round(n))  # the mean row, not a rounded one
    visual_share = visual_tokens / n
    visual_trains = llm_trains if visual_llm_trains is None else visual_llm_trains
    decoder_mult = visual_share * (3.0 if visual_trains else 2.0) + (1 - visual_share) * (3.0 if llm_trains else 2.0)
    head = FLOPS_PER_MAC * row.targets * config.hidden_size * config.vocab_size
    parts = {
        "frozen_vision": float(frozen),
        "vision": (vision - frozen) * (3.0 if vision_trains else 1.0),
        "decoder": decoder * decoder_mult,
        "lm_head": head * 2.0,  # the tied embedding stays frozen in every stage of the study
    }
    if teacher is not None:
        inner = getattr(teacher, "teacher", teacher)  # a CachedTeacher's own network
        size = int(teacher.image_size)
        parts["teacher"] = float(forward_flops(inner, torch.zeros(1, 3, size, size, device=pixels.device))[0])
    return StepFlops(parts, rows_per_step)
