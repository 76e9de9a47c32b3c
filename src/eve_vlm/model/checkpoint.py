"""Checkpoint I/O: our format and the released EVE checkpoints, as configs and state dicts.

Our format is config.json (`model_type: eve_vlm`) + model.safetensors with the official key names,
written atomically. Released checkpoints (`model_type` "eve" / "eve-qwen2") load unchanged.
This module knows tensors and configs only, never the model class, so the model can import it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import EveConfig

logger = logging.getLogger(__name__)

TRAINING_ONLY_PREFIXES = ("model.vision_tower_compressor.", "model.vision_clip.")
ALIGNING_LAYER_PREFIX = "model.vision_tower_compressor."
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder whose contents do not fit the model it describes."""


def read_state_dict(folder: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: single or sharded safetensors, or legacy .bin files."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_file(str(folder / shard)))
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise CheckpointError(f"no model weights (model.safetensors, shards or pytorch_model*.bin) in {folder}")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if index.is_file():
        return [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def _header_shapes_and_dtypes(folder: Path, keys: set[str] | None = None) -> dict[str, tuple[list[int], str]]:
    """Shapes and dtypes of stored tensors from the safetensors headers (no tensor is read)."""
    out: dict[str, tuple[list[int], str]] = {}
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():
                if keys is None or k in keys:
                    sl = handle.get_slice(k)
                    out[k] = (list(sl.get_shape()), str(sl.get_dtype()))
    return out


def stored_dtype(folder: str | Path) -> torch.dtype:
    """The floating dtype of a checkpoint's weights, fp16 promoted to fp32 (see `_dtype_of`)."""
    folder = Path(folder)
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    files = _weight_files(folder)
    if not files:
        return _dtype_of(read_state_dict(folder))  # legacy .bin: read it (small, old checkpoints)
    with safe_open(str(files[0]), framework="pt") as handle:
        for k in handle.keys():
            dt = names.get(str(handle.get_slice(k).get_dtype()))
            if dt is not None:
                return torch.float32 if dt == torch.float16 else dt
    return torch.float32


def official_geometry(folder: str | Path, config: EveConfig) -> None:
    """Set the patch geometry of a released checkpoint's config (not stored in its config.json)
    from the weight shapes in the safetensors headers and preprocessor_config.json."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if raw.get("model_type") == "eve_vlm":
        return
    keys = {"model.vision_tower.patch_embedding.weight", "model.vision_tower.patch_embedding.0.weight",
            "model.vision_tower.patch_embedding.2.weight"}
    headers = _header_shapes_and_dtypes(folder, keys) if _weight_files(folder) else {
        k: (list(v.shape), "") for k, v in read_state_dict(folder).items() if k in keys}
    state = {k: torch.empty(shape, device="meta") for k, (shape, _) in headers.items()}
    _official_strides(folder, config, state)


def stored_keys_with_prefix(folder: str | Path, prefixes: tuple[str, ...]) -> list[str]:
    """Names of the stored tensors that start with one of `prefixes` (from the headers only)."""
    folder = Path(folder)
    if not _weight_files(folder):
        return [k for k in read_state_dict(folder) if k.startswith(prefixes)]
    out: list[str] = []
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            out.extend(k for k in handle.keys() if k.startswith(prefixes))
    return out


def read_aligning_weights(folder: str | Path) -> dict[str, Tensor] | None:
    """A stored v1 patch aligning layer, to continue training it (None when absent)."""
    folder = Path(folder)
    out: dict[str, Tensor] = {}
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():
                if k.startswith(ALIGNING_LAYER_PREFIX):
                    out[k] = handle.get_tensor(k)
    if not _weight_files(folder):
        out = {k: v for k, v in read_state_dict(folder).items() if k.startswith(ALIGNING_LAYER_PREFIX)}
    return out if f"{ALIGNING_LAYER_PREFIX}input_layer.weight" in out else None


def _official_strides(folder: Path, config: EveConfig, state: dict[str, Tensor]) -> None:
    """Released configs do not store the patch geometry: read it from the weights / preprocessor."""
    key = "model.vision_tower.patch_embedding.weight" if config.version == "v1" else "model.vision_tower.patch_embedding.0.weight"
    if key in state:
        config.patch_stride = int(state[key].shape[-1])
    if config.version == "v2" and "model.vision_tower.patch_embedding.2.weight" in state:
        config.merge_stride = int(state["model.vision_tower.patch_embedding.2.weight"].shape[-1])
    pre = folder / "preprocessor_config.json"
    if config.version == "v1" and pre.is_file():
        config.merge_stride = int(json.loads(pre.read_text()).get("conv_stride", config.merge_stride))


@dataclass
class Checkpoint:
    """A checkpoint folder read into a config and state dicts (no model built yet)."""

    folder: Path
    config: EveConfig
    state: dict[str, Tensor]  # the model's weights, training-only tensors removed
    training_state: dict[str, Tensor] = field(default_factory=dict)  # aligning layer / teacher

    @property
    def aligning_weights(self) -> dict[str, Tensor] | None:
        """The stored v1 patch aligning layer, to continue training it (None when absent)."""
        out = {k: v for k, v in self.training_state.items() if k.startswith(ALIGNING_LAYER_PREFIX)}
        return out if f"{ALIGNING_LAYER_PREFIX}input_layer.weight" in out else None

    def check_keys(self, expected: set[str]) -> None:
        """Raise CheckpointError naming the keys that differ from a model's `expected` ones."""
        if self.config.tie_word_embeddings:
            expected = expected - {"lm_head.weight"}
        missing = sorted(expected - set(self.state))
        unexpected = sorted(set(self.state) - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.folder} does not match its config ({self.config.version}, "
                f"{self.config.family}): missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            )

    def cast(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The weights in `dtype` (default: the stored floating dtype, fp16 promoted to fp32)."""
        target = dtype or _dtype_of(self.state)
        return {k: v.to(target) if v.is_floating_point() else v for k, v in self.state.items()}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Config and weights of our checkpoints and the released ones (training-only tensors split off)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    raw = json.loads((folder / "config.json").read_text())
    config = EveConfig.from_dict(raw)
    state = read_state_dict(folder)
    if raw.get("model_type") != "eve_vlm":
        _official_strides(folder, config, state)
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    training = {k: v for k, v in state.items() if k.startswith(TRAINING_ONLY_PREFIXES)}
    if training:
        logger.info(
            "ignoring %d training-only tensors (patch aligning layer / teacher) in %s", len(training), folder
        )
        state = {k: v for k, v in state.items() if k not in training}
    if config.tie_word_embeddings:  # the head is the embedding matrix
        state.pop("lm_head.weight", None)
    return Checkpoint(folder, config, state, training)


def _dtype_of(state: dict[str, Tensor]) -> torch.dtype:
    for v in state.values():
        if v.is_floating_point():
            # fp16 checkpoints are promoted: the official loader's fp16 cast of a bf16-trained model
            # overflows fp16's range; fp32 on CPU is also much faster than half precision.
            return torch.float32 if v.dtype == torch.float16 else v.dtype
    return torch.float32


def atomic_folder(target: str | Path):
    """Context manager yielding a temp folder that replaces `target` only when the block succeeds."""
    return _AtomicFolder(Path(target))


class _AtomicFolder:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def state_for_saving(
    state: dict[str, Tensor], config: EveConfig, include_aligning_layer: bool = True
) -> dict[str, Tensor]:
    """A model's state dict as written to disk: tied head dropped, contiguous CPU tensors."""
    dropped = ("lm_head.weight",) if config.tie_word_embeddings else ()
    return {
        k: v.detach().contiguous().cpu()
        for k, v in state.items()
        if k not in dropped and (include_aligning_layer or not k.startswith(TRAINING_ONLY_PREFIXES))
    }


def save_checkpoint(
    config: EveConfig, state: dict[str, Tensor], path: str | Path, *, include_aligning_layer: bool = True
) -> None:
    """Write config.json + model.safetensors into `path` atomically (replacing any older copy).

    Other files already in the folder (processor, tokenizer) are kept.
    """
    target = Path(path)
    existing_extra = []
    if target.is_dir():
        existing_extra = [p for p in target.iterdir() if p.name not in ("config.json", "model.safetensors")]
    tensors = state_for_saving(state, config, include_aligning_layer)
    with atomic_folder(target) as tmp:
        for p in existing_extra:
            if p.is_file():
                shutil.copy2(p, tmp / p.name)
            elif p.is_dir():
                shutil.copytree(p, tmp / p.name)
        config.save(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
