"""Checkpoint I/O: our format, the released EVE checkpoints, and LLM -> EVE conversion.

Our format is config.json (`model_type: eve_vlm`) + model.safetensors with the official key names,
written atomically. Released checkpoints (`model_type` "eve" / "eve-qwen2") load unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import EveConfig, decoder_fields_from_hf

if TYPE_CHECKING:
    from .eve import EveForCausalLM

logger = logging.getLogger(__name__)

TRAINING_ONLY_PREFIXES = ("model.vision_tower_compressor.", "model.vision_clip.")
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


def load_model(
    cls: type[EveForCausalLM],
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    keep_training_weights: bool = False,
) -> EveForCausalLM:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if raw is None:
        raise FileNotFoundError(f"no config.json in {folder}")
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

    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder} does not match its config ({config.version}, {config.family}): "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )
    target_dtype = dtype or _dtype_of(state)
    state = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers were created on the meta device: rebuild them.
    from .decoder import rope_inv_freq

    model.model.rotary_emb.inv_freq = rope_inv_freq(config)
    model.to(device=device or "cpu")
    if keep_training_weights and "model.vision_tower_compressor.input_layer.weight" in training:
        model._pending_aligning_weights = {  # type: ignore[attr-defined]
            k: v for k, v in training.items() if k.startswith("model.vision_tower_compressor.")
        }
    model.eval()
    return model


def _dtype_of(state: dict[str, Tensor]) -> torch.dtype:
    for v in state.values():
        if v.is_floating_point():
            # fp16 checkpoints are promoted: the official loader's fp16 cast of a bf16-trained model
            # overflows (spec §9 item 9); fp32 on CPU is also much faster than half precision.
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


def model_state_for_saving(model: EveForCausalLM, include_aligning_layer: bool = True) -> dict[str, Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if not include_aligning_layer:
        state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_model(model: EveForCausalLM, path: str | Path, *, include_aligning_layer: bool = True) -> None:
    """Write config.json + model.safetensors into `path` atomically (replacing any older copy)."""
    target = Path(path)
    existing_extra = []
    if target.is_dir():  # keep processor/tokenizer files that were saved next to the model
        existing_extra = [p for p in target.iterdir() if p.name not in ("config.json", "model.safetensors")]
    with atomic_folder(target) as tmp:
        for p in existing_extra:
            if p.is_file():
                shutil.copy2(p, tmp / p.name)
            elif p.is_dir():
                shutil.copytree(p, tmp / p.name)
        model.config.save(tmp)
        save_file(model_state_for_saving(model, include_aligning_layer), str(tmp / "model.safetensors"), metadata={"format": "pt"})


def config_from_llm(llm_folder: str | Path, version: str, **overrides) -> EveConfig:
    """An EveConfig for a Llama/Qwen2 Hugging Face folder, with EVE defaults for the version."""
    data = json.loads(Path(llm_folder, "config.json").read_text())
    fields = decoder_fields_from_hf(data)
    if version == "v1":
        fields.update(patch_stride=14, merge_stride=2, vision_hidden_size=1024)
    else:
        fields.update(patch_stride=16, merge_stride=2, vision_hidden_size=1024, modality_experts=True)
    fields["version"] = version
    fields.update(overrides)
    return EveConfig(**fields)


def convert_llm(
    llm_folder: str | Path,
    version: str,
    *,
    out: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    keep_layers: list[int] | None = None,
    **overrides,
) -> EveForCausalLM:
    """Turn a local Llama/Qwen2 folder into a fresh EVE model (vision parts randomly initialised).

    `keep_layers` builds a shallower decoder from the listed LLM layers, in order (for example the
    first and the last few: the last layers keep the residual stream aligned with the output head,
    which a plain prefix of layers does not).

    v2's vision copies start as copies of the text weights (the official stage 0 -> 1 step, done
    at creation so a model is usable at once; the v2 stage-0 recipe freezes them anyway).
    """
    from .eve import EveForCausalLM

    if keep_layers is not None:
        overrides["num_hidden_layers"] = len(keep_layers)
    config = config_from_llm(llm_folder, version, **overrides)
    torch.manual_seed(seed)
    model = EveForCausalLM(config)
    llm_state = {k: v for k, v in read_state_dict(llm_folder).items() if not k.endswith(IGNORED_SUFFIXES)}
    if keep_layers is not None:
        llm_state = select_layers(llm_state, keep_layers)
        logger.info("decoder built from LLM layers %s of %s", keep_layers, llm_folder)
    dropped = [k for k in llm_state if k.startswith("model.layers.") and int(k.split(".")[2]) >= config.num_hidden_layers]
    if dropped:  # a shallower decoder keeps the LLM's first layers (explicit num_hidden_layers override)
        logger.info("keeping the first %d decoder layers of %s", config.num_hidden_layers, llm_folder)
        llm_state = {k: v for k, v in llm_state.items() if k not in set(dropped)}
    if config.tie_word_embeddings:
        llm_state.pop("lm_head.weight", None)
    result = model.load_state_dict(llm_state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"LLM folder {llm_folder} has keys the decoder does not know: {result.unexpected_keys[:20]}")
    missing = [k for k in result.missing_keys if not _is_new_eve_key(k) and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"LLM folder {llm_folder} lacks decoder weights: {missing[:20]}")
    if config.modality_experts:
        model.init_vision_experts_from_text()
    model.to(dtype)
    if out is not None:
        model.save_pretrained(out)
    return model


def select_layers(state: dict[str, Tensor], keep: list[int]) -> dict[str, Tensor]:
    """The state dict of a decoder made of layers `keep` (renumbered 0..len(keep)-1)."""
    present = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    missing = sorted(set(keep) - present)
    if missing or len(set(keep)) != len(keep):
        raise ValueError(f"keep_layers {keep} must name distinct layers of the LLM (it has 0..{max(present)}; missing {missing})")
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


def _is_new_eve_key(key: str) -> bool:
    return key.startswith(("model.vision_tower.", "model.mm_projector.")) or ".moe_" in key
