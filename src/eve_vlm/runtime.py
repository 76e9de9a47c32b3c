"""Where a model runs and in which precision: the one device / dtype resolver of the library.

Training, serving, evaluation and chat all read `--device` / `--dtype` (or a recipe's `device`)
through these two functions, so "auto" means the same thing everywhere:

* device auto: CUDA when this machine has it (under torchrun, the GPU of this process's
  LOCAL_RANK), else the CPU;
* dtype auto: bfloat16 on CUDA (half the memory, full-range exponent), float32 elsewhere (CPU
  kernels are fastest and exact in float32).

Asking for a device this machine does not have is a `DeviceError` with a one-line message, found
before any model is built.
"""

from __future__ import annotations

import os

import torch

AUTO = "auto"

# Names accepted for --dtype / precision fields, with their short aliases.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# What `--dtype` offers on the command line (aliases are accepted too, but not listed).
DTYPE_CHOICES: tuple[str, ...] = (AUTO, "float32", "bfloat16", "float16")


class DeviceError(ValueError):
    """A device or dtype request that this machine or torch build cannot satisfy."""


def local_rank() -> int:
    """This process's GPU index under torchrun / accelerate (LOCAL_RANK), 0 when launched alone."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise DeviceError(f"LOCAL_RANK must be an integer, got {os.environ['LOCAL_RANK']!r}") from None


def resolve_device(spec: str | torch.device | None = AUTO) -> torch.device:
    """The torch device for `spec` ("auto"/None, "cpu", "cuda", "cuda:1", "mps", ...), checked.

    Raises `DeviceError` for a malformed name or a device this machine lacks, so the caller fails
    before loading weights rather than deep inside `.to()`. Under torchrun, auto also makes this
    process's GPU the current CUDA device.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == AUTO):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = _checked_cuda(torch.device("cuda", local_rank()))
        if "LOCAL_RANK" in os.environ:  # under torchrun: NCCL collectives use the current device
            torch.cuda.set_device(device)
        return device
    try:
        device = spec if isinstance(spec, torch.device) else torch.device(spec.strip())
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        return _checked_cuda(device)
    if device.type == "mps" and not (torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' was requested but this machine has no MPS backend; use device 'cpu' or 'auto'")
    return device


def _checked_cuda(device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceError(
            f"device {str(device)!r} was requested but CUDA is not available (torch {torch.__version__}, "
            f"{build}); use device 'cpu' or 'auto'"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {str(device)!r} was requested but this machine has {count} CUDA device(s)")
    return device


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The weights dtype for `spec` ("auto"/None, "float32", "bf16", ...) on `device`, checked.

    auto is bfloat16 on CUDA and float32 elsewhere; half precision on the CPU is allowed (it
    halves memory) but is slower there than float32.
    """
    device = torch.device(device)
    if isinstance(spec, torch.dtype):
        dtype = spec
    elif spec is None or spec.strip().lower() == AUTO:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        key = spec.strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise DeviceError(f"unknown dtype {spec!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        dtype = DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DeviceError(f"dtype {dtype} is not a weights dtype; choose one of {', '.join(DTYPE_CHOICES)}")
    return dtype
