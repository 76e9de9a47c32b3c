"""Process-group setup and model wrapping for runs under torchrun (one process: no-ops).

`fsdp` is PyTorch's FSDP2 (`fully_shard`): each decoder layer, the v1 projector and the v1 aligning
layer are one sharded unit each; the root unit holds the embeddings, the patch embedding, the final
norm and the head. FSDP2 shards parameters as DTensors and keeps frozen and trainable parameters side by side in
one unit (frozen ones get no gradient and, since the optimizer is built over trainable ones only,
no optimizer state), so the stages that freeze the LLM or the text weights need no regrouping.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# How long a collective waits for a missing rank before failing. torchrun already stops the job
# when a worker process dies; this bounds the wait when a rank hangs without dying.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "EVE_DIST_TIMEOUT_S"


def collective_timeout_s() -> float:
    """`EVE_DIST_TIMEOUT_S` (seconds, default 600): the process group's timeout for collectives."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


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
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=collective_timeout_s()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one (the root comes last, separately): every decoder layer,
    the v1 projector and the v1 aligning layer when present.

    The patch embedding stays in the root unit: it returns a `VisionOutput` dataclass, on which
    FSDP2 cannot hang its pre-backward hook (it hooks tensors in pytrees), so its own unit would
    never be re-gathered for backward. It is small (about 1% of a 7B model)."""
    inner = model.model  # EveModel
    units: list[nn.Module] = list(inner.layers)
    for name in ("mm_projector", "vision_tower_compressor"):
        sub = getattr(inner, name, None)
        if sub is not None:
            units.append(sub)
    return units


def fully_shard_model(
    model: nn.Module, *, mesh=None, bf16: bool = False, cpu_offload: bool = False  # noqa: ANN001 - DeviceMesh
) -> nn.Module:
    """Apply FSDP2 to `model` in place (units first, then the root) and return it.

    bf16: parameters are gathered and computed in bf16, gradients reduced in fp32 and the sharded
    master weights (what the optimizer steps) stay fp32. cpu_offload: shards, gradients and
    optimizer state live in CPU memory between uses.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in shard_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap_model(
    model: nn.Module, strategy: str, info: DistInfo, device: torch.device, *, bf16: bool = False, cpu_offload: bool = False
) -> nn.Module:
    """DDP or FSDP2 around `model` when several processes train it; the model itself otherwise.

    FSDP2 changes `model` in place (its parameters become DTensor shards): the returned module is
    `model` itself.
    """
    if info.world <= 1:
        return model
    if strategy == "fsdp":
        return fully_shard_model(model, bf16=bf16, cpu_offload=cpu_offload)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=True)


def is_fsdp(module: nn.Module) -> bool:
    """True when FSDP2 sharded `module` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """FSDP2 reduces gradients only on the last micro-batch of an accumulation when told so."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(enabled)  # type: ignore[attr-defined]


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the global norm; with FSDP2 shards the norm is reduced over every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm
