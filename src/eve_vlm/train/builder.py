"""Recipe -> the parts of a training run: model, processor, teacher, data stream, optimizer, schedule.

The trainer only wires together what this builds, so a study (like the quickstart) can build its
own parts, or hand over a model it already holds, and still train through the same loop.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import (
    BatchConfig,
    BatchStream,
    DataConfig,
    EveDataset,
    GlobalOrderRecords,
    JsonRecords,
    ReaderConfig,
    open_records,
    teacher_fn_from_processor,
)
from ..model import EveForCausalLM
from ..runtime import resolve_device, resolve_dtype
from .checkpointing import seed_everything
from .distributed import DistInfo, barrier, init_distributed, wrap_model
from .params import build_optimizer, set_trainable
from .recipe import ModelSpec, Recipe, RecipeError
from .schedule import LrSchedule

logger = logging.getLogger(__name__)


@dataclass
class TrainingParts:
    """Everything one training stage needs, built from a recipe (see `build_training`)."""

    model: EveForCausalLM  # or, with a `lora:` section, the PEFT model around it
    processor: Any
    teacher: Any  # a frozen teacher (model.aligning.Teacher) or None
    wrapped: nn.Module  # the model itself, or DDP / FSDP around it
    batches: BatchStream
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scheduler: torch.optim.lr_scheduler.LambdaLR
    groups: dict[str, list[nn.Parameter]]  # trainable parameters by group
    device: torch.device
    dist: DistInfo
    # bf16 autocast on GPU, None (fp32) on CPU; under FSDP2 bf16 also gathers and computes the
    # parameters in bf16 and reduces gradients in fp32 onto fp32 master shards
    autocast_dtype: torch.dtype | None
    accum: int  # micro-batches per optimizer step on each process
    data_path: str
    extra: dict[str, Any] = field(default_factory=dict)


def check_inputs(recipe: Recipe) -> None:
    """Fail on missing paths before anything expensive (a model build or a conversion) starts."""
    for name, value in (("data.path", recipe.data.path), ("data.image_root", recipe.data.image_root)):
        if value and "://" not in value and not any(c in value for c in "{*") and not Path(value).exists():
            raise FileNotFoundError(f"recipe field {name}: no such file or folder: {value}")
    if recipe.model.init and not Path(recipe.model.init).is_dir():
        raise FileNotFoundError(f"recipe field model.init: no such folder: {recipe.model.init}")
    if recipe.teacher.kind == "clip" and recipe.teacher.path and not Path(recipe.teacher.path).is_dir():
        raise FileNotFoundError(f"recipe field teacher.path: no such folder: {recipe.teacher.path}")
    if not recipe.model.init and not recipe.model.tiny:
        raise RecipeError("model.init is empty and model.tiny is false: nothing to train (set model.init=FOLDER)")


def build_model_and_processor(recipe: Recipe, dist: DistInfo = DistInfo()) -> tuple[EveForCausalLM, Any]:
    """The stage's starting model: converted from a plain LLM, loaded from a checkpoint, or tiny."""
    from ..processing import EveProcessor

    spec = recipe.model
    if spec.init and spec.convert_from_llm:
        from ..conversion import convert_llm_folder

        return convert_llm_folder(
            spec.init, None, version=spec.version, vision_hidden_size=spec.vision_hidden_size,
            resolution=spec.resolution, template=spec.template, seed=recipe.seed, **new_model_fields(spec),
        )
    if spec.init:
        model = EveForCausalLM.from_pretrained(spec.init, keep_training_weights=True)
        if spec.vision and model.config.vision != spec.vision:
            raise RecipeError(f"model.vision is {spec.vision} but {spec.init} holds a vision={model.config.vision!r} model")
        processor = EveProcessor.from_pretrained(spec.init, template=spec.template)
        if spec.resolution:  # e.g. v1 672 -> 1344 for the HD fine-tune (same weights)
            cfg = processor.image_processor.config
            key = "image_size" if cfg.version == "v1" else "max_size"
            processor.image_processor.config = cfg.replace(**{key: spec.resolution})
        return model, processor
    from ..testing import make_tiny_checkpoint

    folder = Path(recipe.output_dir) / "init-tiny"
    if dist.main and not (folder / "config.json").is_file():
        make_tiny_checkpoint(folder, spec.version, seed=recipe.seed, flavour="training", **new_model_fields(spec))
    barrier(dist)  # other ranks must not read a half-written folder
    model = EveForCausalLM.from_pretrained(folder)
    if model.config.vision == "encoder":  # the tiny decoder gets the real pretrained encoder
        from ..model.encoder_vision import load_pretrained_encoder

        load_pretrained_encoder(model)
    return model, EveProcessor.from_pretrained(folder, template=spec.template)


def new_model_fields(spec: ModelSpec) -> dict[str, Any]:
    """EveConfig overrides of a new (tiny or converted) model: `extra`, and `vision` (the
    encoder-based model has no modality experts)."""
    if spec.vision != "encoder":
        return dict(spec.extra)
    return {"vision": "encoder", "modality_experts": False, **spec.extra}


def build_teacher(recipe: Recipe, previous: Any = None) -> Any:
    """The recipe's frozen teacher, or None. With `teacher.cache_mb`, a feature-caching wrapper;
    `previous` (the teacher of an earlier stage) is reused when it was built from the same spec."""
    spec = recipe.teacher
    if previous is not None and getattr(previous, "spec", None) == spec:
        return previous
    teacher = _new_teacher(recipe)
    if teacher is not None and spec.cache_mb > 0:
        from ..model.aligning import CachedTeacher

        teacher = CachedTeacher(teacher, int(spec.cache_mb * 2**20))
    if teacher is not None:
        object.__setattr__(teacher, "spec", replace(spec))
    return teacher


def _new_teacher(recipe: Recipe) -> Any:
    spec = recipe.teacher
    if spec.kind == "clip":
        from ..model.aligning import ClipTeacher

        if not spec.path:
            raise RecipeError("teacher.kind=clip needs teacher.path (a local CLIPVisionModel folder)")
        return ClipTeacher.from_pretrained(spec.path, spec.select_layer)
    if spec.kind == "efficientnet":
        from ..model.teacher_efficientnet import EfficientNetTeacher

        return EfficientNetTeacher.from_installed(image_size=spec.image_size or 224)
    if spec.kind == "random_clip":  # a tiny random ViT: tiny recipes and tests
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from ..model.aligning import ClipTeacher

        torch.manual_seed(recipe.seed + 7)
        size = spec.image_size or 56
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=size, patch_size=14)
        return ClipTeacher(CLIPVisionModel(cfg), spec.select_layer)
    return None


def training_data_path(recipe: Recipe, dist: DistInfo) -> tuple[str, str | None]:
    """The manifest and image root to read; tiny recipes without a path get generated shapes data."""
    if recipe.data.path:
        return recipe.data.path, recipe.data.image_root
    from ..testing import generate_shapes_dataset

    folder = Path(recipe.output_dir) / "generated-data"
    path = folder / f"{recipe.data.kind}.jsonl"
    if dist.main and not path.is_file():
        generate_shapes_dataset(folder, recipe.data.generated_samples, recipe.data.kind, seed=recipe.seed)
    barrier(dist)
    return str(path), str(folder)


def count_records(path: str) -> int | None:
    """Records in a JSON / JSONL manifest; None for streamed (tar) data of unknown length."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if path.endswith(".json"):
        return len(json.loads(Path(path).read_text()))
    return None


def build_batches(recipe: Recipe, processor: Any, teacher: Any, path: str, image_root: str | None) -> BatchStream:
    data_cfg = DataConfig(
        max_length=recipe.data.max_length,
        max_broken_fraction=recipe.data.max_broken_fraction,
        template=recipe.data.template,
        independent_turns=recipe.data.independent_turns,
    )
    teacher_fn = None
    if teacher is not None:
        teacher_fn = teacher_fn_from_processor(
            processor, teacher_size=teacher.image_size, teacher_patch=teacher.patch_size,
            mean=teacher.image_mean, std=teacher.image_std,
        )
    source = open_records(path, ReaderConfig(seed=recipe.seed, shuffle=recipe.data.shuffle, image_root=image_root))
    if isinstance(source, JsonRecords) and source.is_jsonl:
        source = GlobalOrderRecords(source)
    dataset = EveDataset(source, processor, data_cfg, teacher_fn=teacher_fn)
    return BatchStream(
        dataset,
        BatchConfig(
            batch_size=recipe.micro_batch_size,
            pad_id=processor.pad_token_id,
            pack=recipe.data.pack,
            max_length=recipe.data.max_length,
            group_by_length=recipe.data.group_by_length,
            seed=recipe.seed,
        ),
        num_workers=recipe.data.num_workers,
    )


def total_steps(recipe: Recipe, path: str) -> int:
    if recipe.max_steps:
        return int(recipe.max_steps)
    n = count_records(path)
    if n is None:
        raise RecipeError("max_steps is required for streamed (tar) data of unknown length")
    return max(1, math.ceil(n * recipe.epochs / recipe.global_batch_size))


def build_training(recipe: Recipe, *, model: EveForCausalLM | None = None, processor: Any = None) -> TrainingParts:
    """Build every part of a stage from `recipe`; `model`/`processor` continue an earlier stage."""
    device = resolve_device(recipe.device)
    dist = init_distributed(device)
    if model is None:
        check_inputs(recipe)
    elif processor is None:
        raise ValueError("a processor is needed to encode the training data")
    accum = recipe.global_batch_size // (recipe.micro_batch_size * dist.world)
    if accum < 1 or recipe.global_batch_size % (recipe.micro_batch_size * dist.world):
        raise RecipeError(
            f"global_batch_size={recipe.global_batch_size} must be a multiple of micro_batch_size="
            f"{recipe.micro_batch_size} x world_size={dist.world}"
        )
    seed_everything(recipe.seed)
    if model is None:
        model, processor = build_model_and_processor(recipe, dist)
    if dist.main:
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)

    if recipe.model.init_vision_experts_from_text:
        n = model.init_vision_experts_from_text()
        logger.info("initialised %d vision-copy tensors from the text weights", n)
    trainable = list(recipe.trainable)
    if model.config.vision == "encoder" and model.config.vision_encoder_trainable and "encoder" not in trainable:
        trainable.append("encoder")  # the config asks for a trainable encoder
    teacher = build_teacher(recipe, model.teacher)
    if teacher is not None:
        # continue the aligning layer of an earlier stage, or the one the checkpoint carried
        current = model.model.vision_tower_compressor
        weights = model.pending_aligning_weights
        if weights is None and current is not None:
            weights = {k: v.detach().clone() for k, v in current.state_dict().items()}
        model.attach_aligning_layer(teacher, weights)
        teacher.to(device)
        model.aligning_loss_weight = recipe.teacher.loss_weight
    elif model.model.vision_tower_compressor is None:
        trainable = [g for g in trainable if g != "aligner"]  # nothing to align without a teacher
    model.to(device)
    model.gradient_checkpointing_enable(recipe.gradient_checkpointing)
    adapter = None  # with a `lora:` section, the PEFT model around `model`: what checkpoints save
    if recipe.lora is not None:
        from .lora import attach_lora

        if dist.world > 1 and recipe.distributed == "fsdp":
            raise RecipeError("lora trains under distributed: ddp (the adapters are small); fsdp is not supported")
        adapter, groups = attach_lora(model, recipe.lora, trainable, recipe.freeze)
    else:
        groups = set_trainable(model, trainable, recipe.freeze)
    dtype = resolve_dtype(recipe.precision, device)

    path, image_root = training_data_path(recipe, dist)
    batches = build_batches(recipe, processor, teacher, path, image_root)
    bf16 = dtype == torch.bfloat16
    wrapped = wrap_model(model, recipe.distributed, dist, device, bf16=bf16, cpu_offload=recipe.cpu_offload)
    if wrapped is model and dist.world > 1 and adapter is None:  # FSDP2 replaced the parameters by their shards
        groups = set_trainable(model, trainable, recipe.freeze)
    optimizer = build_optimizer(groups, recipe.optim, device)
    steps = total_steps(recipe, path)
    o = recipe.optim
    schedule = LrSchedule(int(round(o.warmup_ratio * steps)), steps, o.schedule, o.decay_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return TrainingParts(
        model=adapter if adapter is not None else model, processor=processor, teacher=teacher, wrapped=wrapped, batches=batches,
        optimizer=optimizer, schedule=schedule, scheduler=scheduler, groups=groups, device=device, dist=dist,
        autocast_dtype=dtype if dtype != torch.float32 else None, accum=accum, data_path=path,
    )
