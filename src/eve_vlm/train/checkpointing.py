"""Training checkpoints: `OUTPUT_DIR/checkpoints/step-N/`, written by every rank, resumed exactly.

A checkpoint holds the model and optimizer as a `torch.distributed.checkpoint` (DCP) folder that
every rank writes its own shard of in parallel (`dcp/`), each rank's RNG states (`rng-rankR.pt`),
the scheduler state (`training_state.pt`), the model config, the processor, and
`trainer_state.json` (step, data position, history, the recipe). DCP stores each tensor by name
with its global shape, so a checkpoint written by N processes (FSDP2 shards, DDP or one process)
loads on any other number of them.

Writes are atomic: everything goes into `.step-N.tmp`, and the main rank renames it to `step-N`
only after every rank finished and `trainer_state.json` was written last; a folder named `step-N`
with that file is always complete, and a job killed mid-write leaves only the hidden temp folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import DistInfo, barrier

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
DCP_DIR = "dcp"


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


def _replace_folder(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(
    target: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    processor: Any,
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
    info: DistInfo,
) -> Path:
    """Write one checkpoint folder; every rank calls this (each writes its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = target.with_name(f".{target.name}.tmp")
    if info.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a write a killed job left behind
        tmp.mkdir(parents=True)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_model_options(model))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    barrier(info)
    if info.main:
        if is_adapter_model(model):  # PEFT's adapter_model.safetensors + adapter_config.json
            model.save_pretrained(tmp)  # type: ignore[operator]
        model.config.save(tmp)  # type: ignore[union-attr]
        processor.save_pretrained(tmp)
        torch.save({"scheduler": scheduler_state}, tmp / TRAINING_STATE)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, default=str))
        _replace_folder(tmp, target)
    barrier(info)
    return target


def is_adapter_model(model: nn.Module) -> bool:
    """A PEFT (LoRA) model: its checkpoints hold what trains, the base weights come from model.init."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _model_options(model: nn.Module) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True) if is_adapter_model(model) else None


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINER_STATE).read_text())


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any]:
    """Load model and optimizer state (resharded to this world size) and this rank's RNG states;
    returns the training state (scheduler). Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if not (folder / DCP_DIR).is_dir():
        raise ValueError(f"{folder} holds no distributed checkpoint ({DCP_DIR}/): it was not written by this trainer")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_model_options(model))
    # get_state_dict gives every trainable parameter optimizer state; a parameter that never had a
    # gradient when the checkpoint was written (e.g. a vision copy no visual token reached) has none
    stored = dcp.FileSystemReader(str(folder / DCP_DIR)).read_metadata().state_dict_metadata
    optim_sd["state"] = {
        fqn: entry for fqn, entry in optim_sd["state"].items() if any(f"optim.state.{fqn}.{k}" in stored for k in entry)
    }
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    # the RNG states must stay CPU byte tensors; another world size continues rank 0's streams
    own = folder / f"rng-rank{info.rank}.pt"
    rng = torch.load(own if own.is_file() else folder / "rng-rank0.pt", map_location="cpu", weights_only=False)
    set_rng_state(rng)
    return torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` step folders (all of them when keep <= 0)."""
    root = Path(output_dir) / "checkpoints"
    if keep <= 0 or not root.is_dir():
        return
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
