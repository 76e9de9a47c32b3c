"""Training checkpoints: `OUTPUT_DIR/checkpoints/step-N/`, written atomically, resumed exactly.

A checkpoint holds the model and processor (loadable like any saved model), the optimizer and
scheduler state, every RNG state, and `trainer_state.json` (step, batches taken, history). The
JSON file is written last inside a temporary folder that is renamed into place, so a folder named
`step-N` with that file is always complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.checkpoint import atomic_folder

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(done, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = list_checkpoints(output_dir)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, Python and NumPy: model init, data order and dropout follow the recipe's seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def write_checkpoint(
    target: Path,
    *,
    model: Any,
    processor: Any,
    include_aligning_layer: bool,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Write one complete checkpoint folder atomically (main process only)."""
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp, include_aligning_layer=include_aligning_layer)
        processor.save_pretrained(tmp)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state()}, tmp / TRAINING_STATE)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    return target


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Model weights, training state (optimizer, scheduler, RNG) and trainer state of a checkpoint."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    # the RNG states must stay CPU byte tensors; load_state_dict moves optimizer state to the params
    training = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
    trainer = json.loads((folder / TRAINER_STATE).read_text())
    return weights, training, trainer


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` step folders (all of them when keep <= 0)."""
    root = Path(output_dir) / "checkpoints"
    if keep <= 0 or not root.is_dir():
        return
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
