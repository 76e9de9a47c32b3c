"""Process-group setup and model wrapping for runs under torchrun (one process: no-ops)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); one process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def wrap_model(model: nn.Module, strategy: str, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP or FSDP around `model` when several processes train it; the model itself otherwise."""
    if info.world <= 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from ..model.decoder import DecoderLayer

        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({DecoderLayer}), use_orig_params=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=True)


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, strategy: str, info: DistInfo) -> dict:
    """The optimizer state to save: FSDP gathers its shards, everything else is already whole."""
    if info.world > 1 and strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(wrapped, optimizer)
    return optimizer.state_dict()
