"""Training recipes: one YAML file per stage, parsed into dataclasses (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .catalog import resolve_recipe
from .schedule import LR_SCHEDULES

# Parameter groups a recipe can train, by name.
#   vision  : patch embedding (+ v1 projector)      official: `vision_tower`, `mm_projector`
#   aligner : v1 patch aligning layer (training only)  official: `vision_tower_compressor`
#   experts : v2 modality-specific copies              official: `moe_*`
#   llm     : the decoder's text weights, embeddings, final norm and lm_head
#   encoder : the pretrained vision encoder of a `model.vision: encoder` model
PARAM_GROUPS = ("vision", "aligner", "experts", "llm", "encoder")
# What a recipe trains when it names nothing: every group but a pretrained encoder.
DEFAULT_TRAINABLE = ("vision", "aligner", "experts", "llm")
VISION_KINDS = ("patch", "encoder")  # model.vision: EVE's patch embedding or a pretrained encoder
# Experiment trackers a recipe can log to (`report_to`; train.tracking)
REPORT_TO = ("tensorboard", "wandb")


class RecipeError(ValueError):
    """A recipe file or override that does not describe a valid stage."""


@dataclass
class ModelSpec:
    init: str | None = None  # checkpoint folder (ours or official), or a Llama/Qwen2 folder with convert
    convert_from_llm: bool = False  # init is a plain LLM folder: convert it into a fresh EVE model
    version: str = "v2"
    tiny: bool = False  # build a tiny random model (tests / demos) when init is empty
    vision_hidden_size: int | None = None  # None: the released models' width (processing.presets)
    resolution: int | None = None  # v1 image_size / v2 max_size
    template: str | None = None
    init_vision_experts_from_text: bool = False  # EVEv2 stage 0 -> 1 copy, before training
    # patch | encoder (the LLaVA-style baseline, model.encoder_vision; its encoder fields go in
    # `extra`); None: the checkpoint's, or patch for a new model
    vision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # EveConfig overrides (tiny / conversion)


@dataclass
class DataSpec:
    path: str | None = None  # JSON / JSONL manifest or tar shards; empty: generated data (tiny recipes)
    image_root: str | None = None
    kind: str = "caption"  # generated data kind when path is empty: caption | conversation
    max_length: int = 2048
    pack: bool = False
    group_by_length: bool = False
    max_broken_fraction: float = 0.05
    shuffle: bool = True
    template: str | None = None  # conversation template (default: the processor's)
    # each (question, answer) pair of a record is its own sample about the record's image, all
    # sharing the image prefix in one row (data.DataConfig.independent_turns)
    independent_turns: bool = False
    # DataLoader workers that read, decode, encode and batch while the model trains (0: in the
    # training process). A resume must use the same number: it decides which records each reads.
    num_workers: int = 0
    generated_samples: int = 256


@dataclass
class TeacherSpec:
    kind: str = "none"  # none | clip | efficientnet | random_clip (tiny random ViT, tests)
    path: str | None = None  # CLIPVisionModel folder for kind=clip
    select_layer: int = -2
    image_size: int | None = None  # efficientnet input side
    loss_weight: float = 1.0
    # Keep each image's teacher features (by pixel content) up to this many MiB, and reuse the
    # teacher, store included, in the next stage of the same process when its spec is the same:
    # worth it when images repeat (small data, several epochs); 0 = off (model.aligning.CachedTeacher)
    cache_mb: float = 0.0


@dataclass
class OptimSpec:
    lr: float = 1e-4
    group_lr: dict[str, float] = field(default_factory=dict)  # per parameter group
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    # cosine | constant | wsd (train.schedule.LrSchedule explains them)
    schedule: str = "cosine"
    decay_ratio: float = 0.2
    max_grad_norm: float = 1.0


# The decoder's attention and MLP projections LoRA can adapt; EVEv2's vision copies of them are
# `moe_`-prefixed (`self_attn.moe_q_proj`, `moe_mlp.gate_proj`).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LORA_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclass
class LoraSpec:
    """The recipe's `lora:` section (train/lora.py applies it through PEFT). The decoder then learns
    through low-rank adapters on `target_modules` (with `vision_copies`, EVEv2's vision copies of
    them too) instead of in full; `modules_to_save` names whole modules trained and saved in full
    next to the adapter (e.g. `lm_head`)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    vision_copies: bool = True
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise RecipeError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise RecipeError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        for key in ("target_modules", "modules_to_save"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RecipeError(f"lora.{key} must be a list of names, got {value!r}")
        unknown = sorted(set(self.target_modules) - set(LORA_TARGETS))
        if unknown:
            raise RecipeError(f"unknown lora.target_modules {unknown}: choose from {list(LORA_TARGETS)}")
        if not self.target_modules:
            raise RecipeError("lora.target_modules is empty")


@dataclass
class Recipe:
    name: str = "stage"
    stage: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    trainable: list[str] = field(default_factory=lambda: list(DEFAULT_TRAINABLE))
    # LoRA: the decoder (groups llm, experts) learns through adapters; the other `trainable` groups
    # (vision, aligner) train in full; checkpoints and final/ hold only what trained (None: off)
    lora: LoraSpec | None = None
    # parameter-name patterns (fnmatch) kept frozen inside the trainable groups, e.g. the tied
    # embedding / output head ["model.embed_tokens.*", "lm_head.*"]: saves its gradient and Adam update
    freeze: list[str] = field(default_factory=list)
    global_batch_size: int = 8
    micro_batch_size: int = 8
    max_steps: int | None = None  # default: one epoch of the data
    epochs: float = 1.0
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    distributed: str = "ddp"  # ddp | fsdp (FSDP2, `fully_shard`); used when launched with torchrun
    # FSDP2 only: parameter shards, gradients and optimizer state wait in CPU memory between uses
    cpu_offload: bool = False
    output_dir: str = "runs/stage"
    save_every: int = 0  # steps between periodic checkpoints (0: only final)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    save_aligning_layer: bool = True
    # experiment trackers, e.g. [tensorboard] or [tensorboard, wandb] (train.tracking); none by default
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [g for g in self.trainable if g not in PARAM_GROUPS]
        if unknown:
            raise RecipeError(f"unknown trainable groups {unknown}; known: {list(PARAM_GROUPS)}")
        bad_lr = [g for g in self.optim.group_lr if g not in PARAM_GROUPS]
        if bad_lr:
            raise RecipeError(f"optim.group_lr names unknown groups {bad_lr}")
        if self.global_batch_size % self.micro_batch_size:
            raise RecipeError(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if self.teacher.kind not in ("none", "clip", "efficientnet", "random_clip"):
            raise RecipeError(f"unknown teacher kind {self.teacher.kind!r}")
        if self.model.vision is not None and self.model.vision not in VISION_KINDS:
            raise RecipeError(f"model.vision must be one of {list(VISION_KINDS)}, got {self.model.vision!r}")
        if self.model.vision == "encoder" and self.teacher.kind != "none":
            raise RecipeError("model.vision: encoder has no patch aligning layer: teacher.kind must be none")
        if self.model.vision == "encoder" and self.model.init_vision_experts_from_text:
            raise RecipeError("model.vision: encoder has no modality experts (init_vision_experts_from_text)")
        if self.data.num_workers < 0:
            raise RecipeError(f"data.num_workers must be >= 0, got {self.data.num_workers}")
        if self.teacher.cache_mb < 0:
            raise RecipeError(f"teacher.cache_mb must be >= 0, got {self.teacher.cache_mb}")
        if not isinstance(self.report_to, list) or not all(isinstance(t, str) for t in self.report_to):
            raise RecipeError(f"report_to must be a list of tracker names from {list(REPORT_TO)}, got {self.report_to!r}")
        bad = [t for t in self.report_to if t not in REPORT_TO]
        if bad or len(set(self.report_to)) != len(self.report_to):
            raise RecipeError(f"report_to: unknown or repeated trackers {bad or self.report_to}; known: {list(REPORT_TO)}")
        if self.distributed not in ("ddp", "fsdp"):
            raise RecipeError(f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.cpu_offload and self.distributed != "fsdp":
            raise RecipeError("cpu_offload needs distributed: fsdp (it offloads FSDP2's parameter shards)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise RecipeError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.optim.schedule not in LR_SCHEDULES:
            raise RecipeError(f"optim.schedule must be one of {list(LR_SCHEDULES)}, got {self.optim.schedule!r}")
        if not 0.0 < self.optim.decay_ratio <= 1.0:
            raise RecipeError(f"optim.decay_ratio must be in (0, 1], got {self.optim.decay_ratio}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return _build(cls, data, "")

    @classmethod
    def load(cls, ref: str | Path, overrides: list[str] | None = None) -> Recipe:
        """A recipe from a YAML file path or a shipped recipe's name, with `key=value` overrides."""
        path = resolve_recipe(ref)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping")
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into a nested dict."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Numbers for numeric fields: YAML reads `1e-4` (no dot) as a string, a silent trap for lrs."""
    if value is None and "None" in annotation:
        return None
    if annotation.startswith("float"):
        if isinstance(value, bool):
            raise RecipeError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key} must be a number, got {value!r}") from None
    if annotation.startswith("dict[str, float]"):
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, got {value!r}")
        return {k: _coerce(v, "float", f"{key}.{k}") for k, v in value.items()}
    if annotation.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
        raise RecipeError(f"{key} must be an integer, got {value!r}")
    if annotation == "bool" and not isinstance(value, bool):
        raise RecipeError(f"{key} must be true or false, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"unknown recipe keys in {where or 'recipe'}: {unknown} (known: {sorted(fields)})")
    kwargs = {}
    for name, value in data.items():
        sub = {"model": ModelSpec, "data": DataSpec, "teacher": TeacherSpec, "optim": OptimSpec, "lora": LoraSpec}.get(name) if cls is Recipe else None
        if name == "lora" and cls is Recipe and value is None:
            kwargs[name] = None  # `lora: null`: full fine-tuning
        elif sub is not None:
            kwargs[name] = _build(sub, value or {}, name)
        elif name == "betas":
            kwargs[name] = tuple(_coerce(v, "float", f"{where}.{name}") for v in value)
        else:
            kwargs[name] = _coerce(value, str(fields[name].type), f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise RecipeError(f"{where or 'recipe'}: {exc}") from exc
