"""LLM folder -> EVE model folder (weights, config, processor with the LLM's tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import convert_llm
from .eve import EveForCausalLM


def default_image_config(version: str, resolution: int | None = None, **overrides: Any):
    """The released preprocessing for a version (v1: 672 or 1344 px; v2: max_size 800 or 1600)."""
    from ..processing.images import EveImageConfig

    if version == "v1":
        fields: dict[str, Any] = dict(
            version="v1", image_size=resolution or 672, image_size_clip=336, patch_stride=14, patch_stride_clip=14, conv_stride=2
        )
    else:
        fields = dict(version="v2", max_size=resolution or 800, patch_stride=16, dense_stride=2)
    fields.update(overrides)
    return EveImageConfig(**fields)


def convert_llm_folder(
    llm: str | Path,
    out: str | Path | None,
    *,
    version: str = "v2",
    vision_hidden_size: int = 1024,
    resolution: int | None = None,
    template: str | None = None,
    seed: int = 0,
    image_config: Any = None,
    dtype: torch.dtype = torch.float32,
    **model_overrides: Any,
) -> tuple[EveForCausalLM, Any]:
    """Build a fresh EVE model from a Llama/Qwen2 folder and (optionally) save it with its processor.

    The patch geometry of the model follows the image config so the two always agree.
    """
    from transformers import AutoTokenizer

    from ..processing.images import EveImageProcessor
    from ..processing.processor import EveProcessor

    image_config = image_config or default_image_config(version, resolution)
    merge = image_config.conv_stride if version == "v1" else image_config.dense_stride
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    overrides = dict(
        vision_hidden_size=vision_hidden_size, patch_stride=image_config.patch_stride, merge_stride=merge
    )
    if tokenizer.eos_token_id is not None:
        overrides["eos_token_id"] = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        overrides["pad_token_id"] = tokenizer.pad_token_id
    overrides.update(model_overrides)
    model = convert_llm(llm, version, dtype=dtype, seed=seed, **overrides)
    match_visual_scale(model, image_config)
    processor = EveProcessor(EveImageProcessor(image_config), tokenizer=tokenizer, template=template)
    if out is not None:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor


def parse_layers(text: str) -> tuple[int, ...]:
    """'0-1,28-29' -> (0, 1, 28, 29)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError as exc:
        raise ValueError(f"layer list {text!r} must look like '0-1,28-29'") from exc
    return tuple(out)


def format_layers(layers: tuple[int, ...]) -> str:
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


@torch.no_grad()
def match_visual_scale(model: EveForCausalLM, image_config: Any, samples: int = 4) -> float:
    """Rescale the fresh vision output so visual tokens have the RMS of the LLM's word embeddings.

    PyTorch-default initialisation gives visual tokens of RMS ~1 while pretrained embeddings are
    often ~100x smaller (SmolLM2: ~0.05): the image then swamps the residual stream and the first
    steps diverge. Returns the factor applied.
    """
    stride = model.config.token_stride
    size = max(stride, 4 * stride)
    images = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(samples)]
    tokens = model.model.encode_images(images).tokens
    target = model.model.embed_tokens.weight.float().pow(2).mean().sqrt()
    factor = float(target / tokens.float().pow(2).mean().sqrt().clamp(min=1e-8))
    if model.config.version == "v1":
        last = [m for m in model.model.mm_projector.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    else:
        tower = model.model.vision_tower
        tower.patch_embedding[2].weight.mul_(factor)
        tower.patch_embedding[2].bias.mul_(factor)
        tower.class_embedding.mul_(factor)
        tower.split_embedding.mul_(factor)
    return factor
