"""The trained model as one Hugging Face-style folder, gathered tensor by tensor from the ranks.

`from_pretrained` loads the result: `config.json` plus `model.safetensors`, or, past
`max_shard_bytes`, `model-0000K-of-0000N.safetensors` shards with `model.safetensors.index.json`.
Under FSDP2 every rank gathers one full tensor at a time (a collective, in the same order on every
rank); the main rank keeps at most one shard's worth before writing it, so no rank ever holds the
whole model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.checkpoint import TRAINING_ONLY_PREFIXES, atomic_folder
from .checkpointing import is_adapter_model
from .distributed import DistInfo, barrier

DEFAULT_SHARD_BYTES = 5 * 2**30  # what transformers writes by default


def tensors_to_export(model: nn.Module, include_aligning_layer: bool) -> dict[str, torch.Tensor]:
    """The model's named tensors as written to disk (tied head dropped, aligning layer optional);
    DTensor shards under FSDP2."""
    tied = getattr(model.config, "tie_word_embeddings", False)  # type: ignore[union-attr]
    return {
        k: v
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight") and (include_aligning_layer or not k.startswith(TRAINING_ONLY_PREFIXES))
    }


def export_pretrained(
    model: nn.Module,
    processor: Any,
    target: Path,
    info: DistInfo,
    *,
    include_aligning_layer: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `target` atomically (every rank calls this; only the main rank writes). A PEFT (LoRA)
    model writes its adapter (PEFT's files) and the processor: `eve merge-lora` makes a model of it."""
    if is_adapter_model(model):
        if info.main:
            with atomic_folder(target) as tmp:
                model.save_pretrained(tmp)  # type: ignore[operator]
                processor.save_pretrained(tmp)
        barrier(info)
        return target
    tensors = tensors_to_export(model, include_aligning_layer)
    ctx = atomic_folder(target) if info.main else None
    tmp = ctx.__enter__() if ctx is not None else None
    try:
        files: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        shard: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal shard, size
            if shard and tmp is not None:
                name = f"shard-{len(files)}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                files.append((name, list(shard)))
            shard, size = {}, 0

        for name, value in tensors.items():
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            if info.main:
                shard[name] = full.detach().to("cpu").contiguous()
                size += full.numel() * full.element_size()
                if size >= max_shard_bytes:
                    flush()
            del full
        flush()
        if tmp is not None:
            _name_shards(tmp, files)
            model.config.save(tmp)  # type: ignore[union-attr]
            processor.save_pretrained(tmp)
    except BaseException as exc:
        if ctx is not None:
            ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if ctx is not None:
        ctx.__exit__(None, None, None)
    barrier(info)
    return target


def _name_shards(folder: Path, files: list[tuple[str, list[str]]]) -> None:
    """One file: model.safetensors; several: model-0000K-of-0000N.safetensors and an index."""
    if len(files) == 1:
        (folder / files[0][0]).rename(folder / "model.safetensors")
        return
    n = len(files)
    weight_map: dict[str, str] = {}
    total = 0
    for k, (tmp_name, names) in enumerate(files, 1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        (folder / tmp_name).rename(folder / final)
        total += (folder / final).stat().st_size  # tensor bytes plus a small header per file
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
