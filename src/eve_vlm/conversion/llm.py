"""A Llama/Qwen2 Hugging Face folder -> a fresh EVE model and its processor.

This is the one conversion path. It sits above `model/` and `processing/` because it writes both:
the model's patch geometry follows the image config, and the defaults of both come from the
released models' geometry table (`processing.presets.RELEASED_GEOMETRY`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model.checkpoint import IGNORED_SUFFIXES, CheckpointError, read_state_dict
from ..model.config import EveConfig, decoder_fields_from_hf
from ..model.encoder_vision import find_encoder_vision, load_pretrained_encoder
from ..model.eve import EveForCausalLM
from ..processing.images import EveImageConfig, EveImageProcessor
from ..processing.presets import released_geometry
from ..processing.processor import EveProcessor

logger = logging.getLogger(__name__)


def check_llm_folder(llm_folder: str | Path) -> Path:
    """The folder as a Path, or FileNotFoundError naming what is missing (before any loading)."""
    folder = Path(llm_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LLM folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in LLM folder {folder} (expected a Hugging Face model folder)")
    return folder


def default_image_config(version: str, resolution: int | None = None) -> EveImageConfig:
    """The released preprocessing of a version at its default resolution or at `resolution`
    (v1: square image_size, released 672 / 1344; v2: max_size, released 800 / 1600)."""
    return released_geometry(version).image_config(resolution)


def config_from_llm(llm_folder: str | Path, version: str, **overrides: Any) -> EveConfig:
    """An EveConfig for a Llama/Qwen2 folder, with the released vision geometry of the version."""
    data = json.loads((check_llm_folder(llm_folder) / "config.json").read_text())
    fields = decoder_fields_from_hf(data)
    fields.update(released_geometry(version).model_fields())
    if version == "v2" and overrides.get("vision", "patch") == "patch":  # the encoder-based model has none
        fields["modality_experts"] = True
    fields["version"] = version
    fields.update(overrides)
    return EveConfig(**fields)


def convert_llm(
    llm_folder: str | Path,
    version: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    keep_layers: Sequence[int] | None = None,
    **overrides: Any,
) -> EveForCausalLM:
    """The model half of `convert_llm_folder`: the LLM's weights in an EVE model whose vision
    parts are randomly initialised (no visual-scale matching, no processor).

    `keep_layers` builds a shallower decoder from the listed LLM layers, in order (for example the
    first and the last few: the last layers keep the residual stream aligned with the output head,
    which a plain prefix of layers does not).

    v2's vision copies start as copies of the text weights (the official stage 0 -> 1 step, done
    at creation so a model is usable at once; the v2 stage-0 recipe freezes them anyway).
    """
    if keep_layers is not None:
        overrides["num_hidden_layers"] = len(keep_layers)
    config = config_from_llm(llm_folder, version, **overrides)
    torch.manual_seed(seed)
    model = EveForCausalLM(config)
    llm_state = {k: v for k, v in read_state_dict(llm_folder).items() if not k.endswith(IGNORED_SUFFIXES)}
    if keep_layers is not None:
        llm_state = select_layers(llm_state, list(keep_layers))
        logger.info("decoder built from LLM layers %s of %s", list(keep_layers), llm_folder)
    dropped = {
        k for k in llm_state if k.startswith("model.layers.") and int(k.split(".")[2]) >= config.num_hidden_layers
    }
    if dropped:  # a shallower decoder keeps the LLM's first layers (explicit num_hidden_layers override)
        logger.info("keeping the first %d decoder layers of %s", config.num_hidden_layers, llm_folder)
        llm_state = {k: v for k, v in llm_state.items() if k not in dropped}
    if config.tie_word_embeddings:
        llm_state.pop("lm_head.weight", None)
    result = model.load_state_dict(llm_state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(
            f"LLM folder {llm_folder} has keys the decoder does not know: {result.unexpected_keys[:20]}"
        )
    missing = [
        k
        for k in result.missing_keys
        if not is_new_eve_key(k) and not (config.tie_word_embeddings and k == "lm_head.weight")
    ]
    if missing:
        raise CheckpointError(f"LLM folder {llm_folder} lacks decoder weights: {missing[:20]}")
    if config.modality_experts:
        model.init_vision_experts_from_text()
    if config.vision == "encoder":
        load_pretrained_encoder(model)
    return model.to(dtype)


def convert_llm_folder(
    llm: str | Path,
    out: str | Path | None,
    *,
    version: str = "v2",
    vision_hidden_size: int | None = None,
    resolution: int | None = None,
    template: str | None = None,
    seed: int = 0,
    image_config: EveImageConfig | None = None,
    dtype: torch.dtype = torch.float32,
    keep_layers: Sequence[int] | None = None,
    **model_overrides: Any,
) -> tuple[EveForCausalLM, EveProcessor]:
    """Build a fresh EVE model + processor from a Llama/Qwen2 folder, and save both in `out`
    (unless None).

    The model's patch geometry follows the image config so the two always agree; both default to
    the version's released geometry (`resolution` changes only the image size). The fresh visual
    tokens are rescaled to the RMS of the LLM's word embeddings (`match_visual_scale`).
    """
    from transformers import AutoTokenizer

    llm = check_llm_folder(llm)
    image_config = image_config or default_image_config(version, resolution)
    merge = image_config.conv_stride if version == "v1" else image_config.dense_stride
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    overrides: dict[str, Any] = dict(patch_stride=image_config.patch_stride, merge_stride=merge)
    if vision_hidden_size is not None:
        overrides["vision_hidden_size"] = vision_hidden_size
    if tokenizer.eos_token_id is not None:
        overrides["eos_token_id"] = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        overrides["pad_token_id"] = tokenizer.pad_token_id
    overrides.update(model_overrides)
    model = convert_llm(llm, version, dtype=dtype, seed=seed, keep_layers=keep_layers, **overrides)
    match_visual_scale(model)
    processor = EveProcessor(EveImageProcessor(image_config), tokenizer=tokenizer, template=template)
    if out is not None:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor


def select_layers(state: dict[str, Tensor], keep: list[int]) -> dict[str, Tensor]:
    """The state dict of a decoder made of layers `keep` (renumbered 0..len(keep)-1)."""
    present = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    missing = sorted(set(keep) - present)
    if missing or len(set(keep)) != len(keep):
        raise ValueError(
            f"keep_layers {keep} must name distinct layers of the LLM (it has 0..{max(present)}; missing {missing})"
        )
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("model.layers."):
            parts = key.split(".")
            old = int(parts[2])
            if old not in new_index:
                continue
            parts[2] = str(new_index[old])
            key = ".".join(parts)
        out[key] = value
    return out


def is_new_eve_key(key: str) -> bool:
    """Whether a model key belongs to the parts an LLM does not have (vision, projector, copies)."""
    return key.startswith(("model.vision_tower.", "model.mm_projector.")) or ".moe_" in key


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


def format_layers(layers: Sequence[int]) -> str:
    """(0, 1, 5, 28, 29) -> '0-1,5,28-29' (the inverse of `parse_layers`)."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


@torch.no_grad()
def match_visual_scale(model: EveForCausalLM, samples: int = 4) -> float:
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
    if model.config.vision == "encoder":
        find_encoder_vision(model).scale_output(factor)
    elif model.config.version == "v1":
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
