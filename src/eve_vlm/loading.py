"""Loading a checkpoint folder for inference: the one loader that chat, ask, serve and eval share.

It sits above `model/` and `processing/` because a runnable checkpoint is both: the weights and
the processor (image geometry, tokenizer, chat template) saved next to them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .runtime import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from .model.eve import EveForCausalLM

logger = logging.getLogger(__name__)


def check_checkpoint_folder(path: str | Path) -> Path:
    """`path` as a Path if it is a model folder (has config.json); a one-line error otherwise.

    Cheap, so commands call it before any import of the model code or any weights are read.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"model path is not a folder: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"not a model folder (no config.json): {folder}")
    return folder


def load_for_inference(
    path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
) -> tuple[EveForCausalLM, Any]:
    """(model in eval mode, processor with a tokenizer) from a checkpoint folder.

    `device` and `dtype` follow `eve_vlm.runtime` ("auto": CUDA + bfloat16 if present, else CPU +
    float32); both are checked before the weights are read.
    """
    from .model.eve import EveForCausalLM
    from .processing.processor import EveProcessor

    folder = check_checkpoint_folder(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    processor = EveProcessor.from_pretrained(folder)
    if processor.tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer files; inference needs one")
    model = EveForCausalLM.from_pretrained(folder, dtype=torch_dtype, device=dev).eval()
    logger.debug("loaded %s on %s as %s", folder, dev, torch_dtype)
    return model, processor
