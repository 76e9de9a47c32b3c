"""Which recipe changes a resume may make: those that leave the run's trajectory as it was.

A checkpoint records its recipe. Resuming with another learning rate, global batch, length or data
would quietly continue a different run (and replay the data as if nothing changed), so those
differences are refused unless the user says otherwise. Where the run writes, how often it saves,
how many processes it runs on and how they hold the model (DDP / FSDP2, micro-batch, activation
checkpointing, offload) may change: that is what resuming on another cluster is for.
"""

from __future__ import annotations

from typing import Any

# Recipe fields (dotted) that do not change what the model learns from step to step.
FREE_TO_CHANGE = frozenset({
    "name", "stage", "output_dir", "save_every", "keep_checkpoints", "log_every", "device",
    "distributed", "cpu_offload", "gradient_checkpointing", "micro_batch_size", "report_to",
    "data.num_workers",  # checked on its own: it decides which records each worker reads
    "teacher.cache_mb",
})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "extra" and key != "group_lr":
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for every trajectory field that differs."""
    a, b = flatten(saved), flatten(current)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in FREE_TO_CHANGE:
            continue
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            diffs.append((key, None if x is missing else x, None if y is missing else y))
    return diffs
