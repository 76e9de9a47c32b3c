"""One training loop for every EVE stage, configured by a `Recipe`.

Gradient accumulation with the LM loss averaged per supervised token over the whole global batch
(not per micro-batch: spec §9 item 24), clipping, warm-up + cosine schedule, per-group learning
rates, bf16 autocast on GPU / fp32 on CPU, DDP or FSDP under torchrun, atomic checkpoints and an
exact resume (model, optimizer, scheduler, RNG and data position).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..data import (
    BatchConfig,
    DataConfig,
    EveDataset,
    JsonRecords,
    ReaderConfig,
    Record,
    RecordSource,
    Split,
    iter_batches,
    open_records,
)
from ..data.dataset import teacher_fn_from_processor
from ..model import EveForCausalLM
from ..model.checkpoint import atomic_folder
from .recipe import Recipe

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- parameter groups
def _num_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def param_group_of(name: str) -> str:
    if name.startswith("model.vision_tower_compressor."):
        return "aligner"
    if name.startswith(("model.vision_tower.", "model.mm_projector.")):
        return "vision"
    if ".moe_" in name:
        return "experts"
    return "llm"


def set_trainable(
    model: EveForCausalLM, groups: list[str], freeze: list[str] | None = None
) -> dict[str, list[nn.Parameter]]:
    """Freeze everything except the named groups, then the parameters matching a `freeze` pattern
    (fnmatch on names; a pattern that matches nothing is an error). Returns the trainable
    parameters by group."""
    out: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False))  # tied weights under every name
    frozen: set[int] = set()
    for pattern in freeze or []:
        hits = {id(p) for n, p in named if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter (names look like {named[0][0]!r})")
        frozen |= hits
    for name, p in model.named_parameters():
        group = param_group_of(name)
        p.requires_grad_(group in groups and id(p) not in frozen)
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.setdefault(group, []).append(p)
    if not out:
        raise ValueError(f"no trainable parameters for groups {groups}")
    return out


def lr_lambda(warmup: int, total: int, schedule: str, decay_ratio: float = 0.2) -> Callable[[int], float]:
    """The learning-rate multiplier at each step (OptimSpec.schedule explains the schedules)."""
    decay_steps = max(1, round(decay_ratio * total))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "wsd":
            return min(1.0, (total - step) / decay_steps)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


# ---------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(spec: str, info: DistInfo | None = None) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# ---------------------------------------------------------------------- results
@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- building blocks
def build_model_and_processor(recipe: Recipe) -> tuple[EveForCausalLM, Any]:
    from ..processing.processor import EveProcessor

    spec = recipe.model
    if spec.init and spec.convert_from_llm:
        from ..model.convert import convert_llm_folder

        model, processor = convert_llm_folder(
            spec.init,
            None,
            version=spec.version,
            vision_hidden_size=spec.vision_hidden_size,
            resolution=spec.resolution,
            template=spec.template,
            seed=recipe.seed,
            **spec.extra,
        )
        return model, processor
    if spec.init:
        model = EveForCausalLM.from_pretrained(spec.init, keep_training_weights=True)
        processor = EveProcessor.from_pretrained(spec.init, template=spec.template)
        if spec.resolution:  # e.g. v1 672 -> 1344 for the HD fine-tune (same weights)
            cfg = processor.image_processor.config
            key = "image_size" if cfg.version == "v1" else "max_size"
            processor.image_processor.config = cfg.replace(**{key: spec.resolution})
        return model, processor
    if spec.tiny:
        from .tiny import make_tiny_checkpoint

        folder = Path(recipe.output_dir) / "init-tiny"
        main = not dist.is_initialized() or dist.get_rank() == 0
        if main and not (folder / "config.json").is_file():
            make_tiny_checkpoint(folder, spec.version, seed=recipe.seed, **spec.extra)
        if dist.is_initialized():  # other ranks must not read a half-written folder
            dist.barrier()
        model = EveForCausalLM.from_pretrained(folder)
        processor = EveProcessor.from_pretrained(folder, template=spec.template)
        return model, processor
    raise ValueError("recipe.model.init is empty and model.tiny is false: nothing to train")


def build_teacher(recipe: Recipe, previous=None):
    """The recipe's frozen teacher, or None. With `teacher.cache_mb`, a feature-caching wrapper;
    `previous` (the teacher of an earlier stage) is reused when it was built from the same spec."""
    spec = recipe.teacher
    if previous is not None and getattr(previous, "spec", None) == spec:
        return previous
    teacher = _load_teacher(recipe)
    if teacher is not None and spec.cache_mb > 0:
        from ..model.aligning import CachedTeacher

        teacher = CachedTeacher(teacher, int(spec.cache_mb * 2**20))
    if teacher is not None:
        object.__setattr__(teacher, "spec", replace(spec))
    return teacher


def _load_teacher(recipe: Recipe):
    spec = recipe.teacher
    if spec.kind == "clip":
        from ..model.aligning import ClipTeacher

        if not spec.path:
            raise ValueError("teacher.kind=clip needs teacher.path (a local CLIPVisionModel folder)")
        return ClipTeacher.from_pretrained(spec.path, spec.select_layer)
    if spec.kind == "efficientnet":
        from ..model.teacher_efficientnet import EfficientNetTeacher

        return EfficientNetTeacher.from_installed(image_size=spec.image_size or 224)
    if spec.kind == "random_clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from ..model.aligning import ClipTeacher

        torch.manual_seed(recipe.seed + 7)
        size = spec.image_size or 56
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=size, patch_size=14)
        return ClipTeacher(CLIPVisionModel(cfg), spec.select_layer)
    return None


def data_path(recipe: Recipe, info: DistInfo) -> tuple[str, str | None]:
    if recipe.data.path:
        return recipe.data.path, recipe.data.image_root
    from .tiny import generate_shapes_dataset

    folder = Path(recipe.output_dir) / "generated-data"
    path = folder / f"{recipe.data.kind}.jsonl"
    if info.main and not path.is_file():
        generate_shapes_dataset(folder, recipe.data.generated_samples, recipe.data.kind, seed=recipe.seed)
    if info.world > 1:
        dist.barrier()
    return str(path), str(folder)


def count_records(path: str) -> int | None:
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if path.endswith(".json"):
        return len(json.loads(Path(path).read_text()))
    return None


class GlobalOrderRecords(RecordSource):
    """Every rank reads the same globally shuffled stream and keeps every n-th record.

    A JSONL reader splits first and shuffles each split with its own buffer, so the records of a
    global batch would depend on the world size. Here rank r of n keeps records r, r+n, ... of the
    one-process order: global step k trains on the same records on 1 or n processes (only lines
    are parsed twice; images are decoded by the rank that keeps them).
    """

    def __init__(self, inner: RecordSource) -> None:
        self.inner = inner

    def iter(self, epoch: int = 0, split: Split = Split(), position: int = 0) -> Iterator[Record]:
        skip = split.skip_for(position)
        mine = 0
        for i, record in enumerate(self.inner.iter(epoch, Split(), 0)):
            if i % split.count != split.index:
                continue
            if mine >= skip:
                yield record
            mine += 1


class MicroBatches:
    """Endless, deterministic stream of micro-batches (epoch after epoch); position = batches taken."""

    def __init__(self, dataset: EveDataset, batch_cfg: BatchConfig) -> None:
        self.dataset = dataset
        self.batch_cfg = batch_cfg
        self.epoch = 0
        self.taken = 0
        self._it: Iterator[dict[str, Any]] | None = None
        self._skipped: dict[str, int] = {}  # skip counts of finished epochs
        self._seen = 0

    def _start_epoch(self) -> None:
        self.dataset.set_epoch(self.epoch)
        self._it = iter_batches(iter(self.dataset), replace(self.batch_cfg, seed=self.batch_cfg.seed + self.epoch))

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
                self.taken += 1
                return batch
            except StopIteration:
                self._add_epoch_stats()
                self.epoch += 1
                self._it = None
        raise RuntimeError("the training data produced no batch (every record was skipped or the data is empty)")

    def _add_epoch_stats(self) -> None:
        stats = self.dataset.stats
        for reason, n in stats.counts.items():
            self._skipped[reason] = self._skipped.get(reason, 0) + n
        self._seen += stats.total_seen

    def skip_counts(self) -> tuple[dict[str, int], int]:
        """Skipped records by reason and records read, over every epoch so far (this process).

        The dataset's own stats restart with each pass; a run's report must cover all of them.
        """
        counts = dict(self._skipped)
        if self._it is not None:  # the pass in progress
            for reason, n in self.dataset.stats.counts.items():
                counts[reason] = counts.get(reason, 0) + n
            return counts, self._seen + self.dataset.stats.total_seen
        return counts, self._seen

    def skip(self, n: int) -> None:
        """Replay n micro-batches (exact resume: same shuffles, same packing)."""
        for _ in range(n):
            self.next()


# ---------------------------------------------------------------------- checkpoints
_STEP_DIR = re.compile(r"^step-(\d+)$")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1))) if done else None  # type: ignore[union-attr]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        *,
        model: EveForCausalLM | None = None,
        processor: Any = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True,
    ) -> None:
        self.recipe = recipe
        self.on_log = on_log
        self.progress = progress
        self.device = resolve_device(recipe.device)
        self.info = init_distributed(self.device)
        torch.manual_seed(recipe.seed)
        random.seed(recipe.seed)
        np.random.seed(recipe.seed)
        if model is None:
            model, processor = build_model_and_processor(recipe)
        if processor is None:
            raise ValueError("a processor is needed to encode the training data")
        self.model, self.processor = model, processor
        self.out = Path(recipe.output_dir)
        if self.info.main:
            self.out.mkdir(parents=True, exist_ok=True)

        if recipe.model.init_vision_experts_from_text:
            n = model.init_vision_experts_from_text()
            logger.info("initialised %d vision-copy tensors from the text weights", n)
        self.teacher = build_teacher(recipe, getattr(model, "teacher", None))
        if self.teacher is not None:
            pending = getattr(model, "_pending_aligning_weights", None)
            current = model.model.vision_tower_compressor
            if pending is None and current is not None:  # continue the aligning layer of an earlier stage
                pending = {k: v.detach().clone() for k, v in current.state_dict().items()}
            model.attach_aligning_layer(self.teacher, pending)
            self.teacher.to(self.device)
            model.aligning_loss_weight = recipe.teacher.loss_weight
        elif "aligner" in recipe.trainable and model.model.vision_tower_compressor is None:
            recipe.trainable = [g for g in recipe.trainable if g != "aligner"]
        model.to(self.device)
        model.gradient_checkpointing_enable(recipe.gradient_checkpointing)
        self.groups = set_trainable(model, recipe.trainable, recipe.freeze)
        self.autocast_dtype = self._autocast_dtype()

        self.accum = recipe.global_batch_size // (recipe.micro_batch_size * self.info.world)
        if self.accum < 1 or recipe.global_batch_size % (recipe.micro_batch_size * self.info.world):
            raise ValueError(
                f"global_batch_size={recipe.global_batch_size} must be a multiple of micro_batch_size="
                f"{recipe.micro_batch_size} x world_size={self.info.world}"
            )
        path, image_root = data_path(recipe, self.info)
        self.data_path = path
        data_cfg = DataConfig(
            max_length=recipe.data.max_length,
            max_broken_fraction=recipe.data.max_broken_fraction,
            template=recipe.data.template,
            independent_turns=recipe.data.independent_turns,
        )
        teacher_fn = None
        if self.teacher is not None:
            t = self.teacher
            teacher_fn = teacher_fn_from_processor(
                processor, teacher_size=t.image_size, teacher_patch=t.patch_size, mean=t.image_mean, std=t.image_std
            )
        source = open_records(path, ReaderConfig(seed=recipe.seed, shuffle=recipe.data.shuffle, image_root=image_root))
        if isinstance(source, JsonRecords) and source.is_jsonl:
            source = GlobalOrderRecords(source)
        self.dataset = EveDataset(source, processor, data_cfg, teacher_fn=teacher_fn)
        pad_id = processor.pad_token_id
        self.batches = MicroBatches(
            self.dataset,
            BatchConfig(
                batch_size=recipe.micro_batch_size,
                pad_id=pad_id,
                pack=recipe.data.pack,
                max_length=recipe.data.max_length,
                group_by_length=recipe.data.group_by_length,
                seed=recipe.seed,
            ),
        )
        self.max_steps = self._max_steps(path)
        self.wrapped = self._wrap(model)
        self.optimizer = self._optimizer()
        self.warmup_steps = int(round(recipe.optim.warmup_ratio * self.max_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(self.warmup_steps, self.max_steps, recipe.optim.schedule, recipe.optim.decay_ratio),
        )
        self.step = 0
        self.samples = 0
        self.tokens = 0
        self.history: list[dict[str, Any]] = []

    # .................................................................. setup helpers
    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.recipe.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _max_steps(self, path: str) -> int:
        if self.recipe.max_steps:
            return int(self.recipe.max_steps)
        n = count_records(path)
        if n is None:
            raise ValueError("max_steps is required for streamed (tar) data of unknown length")
        return max(1, math.ceil(n * self.recipe.epochs / self.recipe.global_batch_size))

    def _wrap(self, model: EveForCausalLM) -> nn.Module:
        if self.info.world <= 1:
            return model
        if self.recipe.distributed == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            from ..model.decoder import DecoderLayer

            return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({DecoderLayer}), use_orig_params=True)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=True)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.recipe.optim
        groups = [
            {"params": params, "lr": o.group_lr.get(name, o.lr), "name": name} for name, params in self.groups.items()
        ]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)

    # .................................................................. state
    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically; a crash mid-write never leaves it looking complete."""
        target = self.out / "checkpoints" / f"step-{self.step}"
        state = self._optim_state()
        if self.info.main:
            with atomic_folder(target) as tmp:
                self.model.save_pretrained(tmp, include_aligning_layer=self.recipe.save_aligning_layer)
                self.processor.save_pretrained(tmp)
                torch.save({"optimizer": state, "scheduler": self.scheduler.state_dict(), "rng": _rng_state()}, tmp / "training_state.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(self._trainer_state(), indent=2))
            self._prune_checkpoints()
        if self.info.world > 1:
            dist.barrier()
        return target

    def _optim_state(self) -> dict[str, Any]:
        if self.info.world > 1 and self.recipe.distributed == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.optim_state_dict(self.wrapped, self.optimizer)
        return self.optimizer.state_dict()

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro_batches": self.batches.taken,
            "samples": self.samples,
            "tokens": self.tokens,
            "max_steps": self.max_steps,
            "world_size": self.info.world,
            "history": self.history,
        }

    def _prune_checkpoints(self) -> None:
        keep = self.recipe.keep_checkpoints
        root = self.out / "checkpoints"
        steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:]))
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, checkpoint: Path | None = None) -> bool:
        ckpt = checkpoint or latest_checkpoint(self.out)
        if ckpt is None:
            logger.info("no checkpoint to resume from in %s: starting fresh", self.out)
            return False
        from safetensors.torch import load_file

        weights = load_file(str(ckpt / "model.safetensors"))
        result = self.model.load_state_dict(weights, strict=False)
        allowed_missing = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: {result}")
        # CPU: the RNG states must stay CPU byte tensors; load_state_dict moves optimizer state to the params
        st = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        ts = json.loads((ckpt / "trainer_state.json").read_text())
        self.step, self.samples, self.tokens = ts["step"], ts["samples"], ts["tokens"]
        self.history = ts.get("history", [])
        self.batches.skip(ts["micro_batches"])
        _set_rng_state(st["rng"])
        metrics = self.out / "metrics.jsonl"
        if self.info.main and metrics.is_file():  # drop steps logged after the checkpoint
            kept = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))
        logger.info("resumed from %s at step %d", ckpt, self.step)
        return True

    # .................................................................. training
    def _forward(self, batch: dict[str, Any]) -> Any:
        dev = self.device
        kwargs = {
            "input_ids": batch["input_ids"].to(dev),
            "attention_mask": batch["attention_mask"].to(dev),
            "labels": batch["labels"].to(dev),
            "images": [im.to(dev) for im in batch.get("images", [])] or None,
            "return_logits": False,
        }
        for key in ("segment_ids", "branch_ids"):
            if key in batch:
                kwargs[key] = batch[key].to(dev)
        if "teacher_pixels" in batch and self.teacher is not None:
            kwargs["teacher_pixels"] = batch["teacher_pixels"].to(dev)
            kwargs["teacher_masks"] = batch["teacher_masks"].to(dev)
        ctx = torch.autocast(dev.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx:
            return self.wrapped(**kwargs)

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.wrapped.train()
        micro = [self.batches.next() for _ in range(self.accum)]
        # The LM loss is normalised by the supervised-token count of the whole global batch, known
        # before any forward: a row's first label is never a target (nothing precedes it) and image
        # positions are never supervised, so the count follows from the text-level labels.
        counts = torch.tensor(
            [float(_num_targets(b["labels"])) for b in micro] + [0.0], device=self.device
        )
        counts[-1] = counts[:-1].sum()
        if self.info.world > 1:
            dist.all_reduce(counts)
        total_tokens = max(counts[-1].item(), 1.0)
        lm_sum = torch.zeros((), device=self.device)
        align_sum = torch.zeros((), device=self.device)
        local_tokens = 0
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            no_sync = self.info.world > 1 and not last and hasattr(self.wrapped, "no_sync")
            with self.wrapped.no_sync() if no_sync else contextlib.nullcontext():
                out = self._forward(batch)
                loss = out.lm_loss_sum * (self.info.world / total_tokens)
                if out.aligning_loss is not None:
                    loss = loss + out.aligning_loss * (self.model.aligning_loss_weight / self.accum)
                    align_sum += out.aligning_loss.detach()
                loss.backward()
            lm_sum += out.lm_loss_sum.detach()
            local_tokens += int(out.valid.sum())  # tokens processed (text + visual)
        params = [p for ps in self.groups.values() for p in ps]
        if self.recipe.optim.max_grad_norm and self.recipe.optim.max_grad_norm > 0:
            if hasattr(self.wrapped, "clip_grad_norm_"):
                grad_norm = self.wrapped.clip_grad_norm_(self.recipe.optim.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.max_grad_norm)
        else:
            grad_norm = torch.tensor(0.0)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.stack([lm_sum, align_sum, torch.tensor(float(local_tokens), device=self.device)])
        if self.info.world > 1:
            dist.all_reduce(stats)
        self.step += 1
        n_samples = sum(int(b["input_ids"].shape[0]) for b in micro) * self.info.world
        seconds = time.perf_counter() - t0
        self.samples += n_samples
        self.tokens += int(stats[2].item())
        lm_loss = stats[0].item() / total_tokens
        rec = {
            "step": self.step,
            "loss": lm_loss + (stats[1].item() / (self.accum * self.info.world)) * self.model.aligning_loss_weight,
            "lm_loss": lm_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": stats[2].item() / seconds,
            "seconds": seconds,
            "samples": self.samples,
            "tokens": self.tokens,
        }
        if self.teacher is not None:
            rec["aligning_loss"] = stats[1].item() / (self.accum * self.info.world)
        return rec

    def decay_start(self, total: int | None = None) -> int:
        """The step at which a wsd schedule over `total` steps (default: the current plan) starts to decay."""
        total = self.max_steps if total is None else total
        return total - max(1, round(self.recipe.optim.decay_ratio * total))

    def length_can_change(self) -> bool:
        """Whether `set_max_steps` may still change this run's length (constant, or wsd before its decay)."""
        schedule = self.recipe.optim.schedule
        return schedule == "constant" or schedule == "wsd" and self.step < self.decay_start()

    def shortest_length(self) -> int:
        """The fewest steps this run can still be set to: under wsd, the decay of the new length must
        lie wholly ahead."""
        total = self.step + 1
        while self.recipe.optim.schedule == "wsd" and self.decay_start(total) <= self.step:
            total += 1
        return total

    def set_max_steps(self, total: int) -> None:
        """Lengthen or shorten a run while its learning rate is still flat.

        Why: a wall-clock budget planned from earlier stages' speed can be re-planned from this
        stage's own. Only a constant or wsd schedule allows it, and under wsd only while the decay
        of both the old and the new length is still ahead: the run keeps the warm-up it began with,
        its flat phase runs on, and it decays over the last `decay_ratio` of the new length.
        """
        schedule = self.recipe.optim.schedule
        if schedule not in ("wsd", "constant"):
            raise ValueError(f"the number of steps can change mid-run only under a wsd or constant schedule, not {schedule!r}")
        if schedule == "wsd" and self.step >= min(self.decay_start(), self.decay_start(total)):
            raise ValueError(
                f"step {self.step}: a wsd run's length can change only before its decay (which starts at step "
                f"{self.decay_start()} now, and would at {self.decay_start(total)} for {total} steps)"
            )
        if total <= self.step:
            raise ValueError(f"cannot end a run at step {total}: it is at step {self.step}")
        self.max_steps = total
        fn = lr_lambda(self.warmup_steps, total, schedule, self.recipe.optim.decay_ratio)
        self.scheduler.lr_lambdas = [fn] * len(self.optimizer.param_groups)

    def train(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run to max_steps (or `stop_after` steps, for tests of interruption)."""
        if resume:
            self.resume()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc=self.recipe.name,
            disable=not (self.progress and self.info.main),
            dynamic_ncols=True,
        )
        metrics_path = self.out / "metrics.jsonl"
        start = time.perf_counter()
        ran = 0
        while self.step < self.max_steps:
            rec = self.train_step()
            self.history.append(rec)
            ran += 1
            if self.info.main:
                if self.recipe.log_every and self.step % self.recipe.log_every == 0:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.on_log:
                self.on_log(rec)  # may re-plan the run's length (set_max_steps)
                if bar.total != self.max_steps:
                    bar.total = self.max_steps
                    bar.refresh()
            if self.recipe.save_every and self.step % self.recipe.save_every == 0 and self.step < self.max_steps:
                self.save_checkpoint()
            if stop_after is not None and ran >= stop_after:
                bar.close()
                return TrainResult(self.out, self.out / "final", self.history)
        bar.close()
        return self.finish(time.perf_counter() - start)

    def finish(self, seconds: float) -> TrainResult:
        final = self.out / "final"
        skipped, seen = self.batches.skip_counts()
        if self.info.world > 1:  # every rank read its own share of the records
            parts: list[Any] = [None] * self.info.world
            dist.all_gather_object(parts, (skipped, seen))
            skipped, seen = {}, 0
            for counts, n in parts:
                seen += n
                for reason, k in counts.items():
                    skipped[reason] = skipped.get(reason, 0) + k
        if self.info.main:
            with atomic_folder(final) as tmp:
                self.model.save_pretrained(tmp, include_aligning_layer=self.recipe.save_aligning_layer)
                self.processor.save_pretrained(tmp)
            summary = {
                "recipe": self.recipe.name,
                "steps": self.step,
                "samples": self.samples,
                "tokens": self.tokens,
                "seconds": round(seconds, 2),
                "skipped_records": skipped,
                "records_seen": seen,
                "final_loss": self.history[-1]["loss"] if self.history else None,
                "world_size": self.info.world,
                "device": str(self.device),
            }
            if hasattr(self.teacher, "hits"):  # a CachedTeacher: totals since it was built (earlier stages too)
                summary["teacher_cache"] = {"hits": self.teacher.hits, "misses": self.teacher.misses}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            (self.out / "recipe.json").write_text(json.dumps(self.recipe.to_dict(), indent=2, default=str))
            if skipped:
                logger.warning("skipped %d of %d records read: %s", sum(skipped.values()), seen, skipped)
            plot_history(self.history, self.out / "loss.png", title=self.recipe.name)
        else:
            summary = {}
        if self.info.world > 1:
            dist.barrier()
        return TrainResult(self.out, final, self.history, summary)


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss (and aligning loss) and learning rate against step."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(steps, [h["lm_loss"] for h in history], label="LM loss")
    if "aligning_loss" in history[0]:
        ax1.plot(steps, [h["aligning_loss"] for h in history], label="aligning loss")
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


def train(recipe: Recipe, **kwargs: Any) -> TrainResult:
    resume = kwargs.pop("resume", False)
    return Trainer(recipe, **kwargs).train(resume=resume)
