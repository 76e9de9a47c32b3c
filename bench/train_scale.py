"""Training on several CPU processes: step time of 1 process vs 2 (DDP and FSDP2) on the same global
batch, and the parameter and optimizer-state bytes each rank holds.

    PYTHONPATH=src python bench/train_scale.py [--steps 8] [--set key=value ...]

One run trains the same recipe three times, `--steps` optimizer steps each: in one process, then
in 2 processes under torchrun (gloo) with `distributed=ddp`, then with `distributed=fsdp` (FSDP2).
The global batch is the recipe's, so 1 process accumulates over 2 micro-batches where each of 2
processes takes 1. Each worker (this file with `--worker`) records its step times (the trainer's
`seconds`, first 2 steps left out as warm-up) and the bytes of the parameters and of the AdamW
state it holds after training, read from its local tensors (under FSDP2 the DTensor shards'
`to_local()`). FSDP2 should hold about 1/N of both per rank, DDP all of it on every rank.

The default model is the tiny EVEv2 full-alignment stage (every group trains, so every parameter
has optimizer state) widened to hidden 256 and 4 layers. A CPU with few cores runs 2 processes on
the same cores as 1: step-time ratios here show the communication and bookkeeping cost of
sharding, not the speed-up of more GPUs. The printed figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

RECIPE = "tiny/eve_v2/2_fullalign"
WIDER = ["model.extra={hidden_size: 256, intermediate_size: 688, num_hidden_layers: 4, num_attention_heads: 4, "
         "num_key_value_heads: 2}", "global_batch_size=8", "micro_batch_size=4", "save_every=0", "log_every=0"]
WARMUP = 2


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # a DTensor shard under FSDP2
    return to_local() if to_local is not None else t


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters (all, and trainable) and of optimizer state held by this process."""
    params = [_local(p) for p in model.parameters()]
    trainable = [_local(p) for p in model.parameters() if p.requires_grad]
    state = [_local(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "param_bytes": sum(t.numel() * t.element_size() for t in params),
        "trainable_bytes": sum(t.numel() * t.element_size() for t in trainable),
        "optim_bytes": sum(t.numel() * t.element_size() for t in state),
    }


def worker(args: argparse.Namespace) -> None:
    from eve_vlm.train import Recipe, Trainer

    torch.set_num_threads(1)
    recipe = Recipe.load(args.recipe, [*WIDER, *args.overrides, f"max_steps={args.steps}"])
    trainer = Trainer.from_recipe(recipe, progress=False)
    trainer.train(stop_after=args.steps)  # no export: only the steps are timed
    rank = trainer.dist.rank
    result = {"rank": rank, "world": trainer.dist.world,
              "seconds": [h["seconds"] for h in trainer.state.history],
              **held_bytes(trainer.model, trainer.parts.optimizer)}
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, strategy: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Run the workers of one configuration and return each rank's result."""
    out = work / f"{nproc}-{strategy}"
    out.mkdir()
    worker_args = [__file__, "--worker", "--recipe", args.recipe, "--steps", str(args.steps), "--result-dir", str(out),
                   "--set", f"output_dir={out / 'run'}", "--set", f"distributed={strategy}"]
    for item in args.overrides:
        worker_args += ["--set", item]
    if nproc == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), *worker_args]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def step_time(results: list[dict[str, Any]]) -> float:
    """Median step time after warm-up, of the slowest rank (the step ends when every rank's does)."""
    return max(statistics.median(r["seconds"][WARMUP:]) for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= WARMUP:
        ap.error(f"--steps must be more than the {WARMUP} warm-up steps")
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = {name: launch(n, s, args, work) for name, n, s in
                (("1 process", 1, "ddp"), ("2 x DDP", 2, "ddp"), ("2 x FSDP2", 2, "fsdp"))}
    base = runs["1 process"][0]
    t1 = step_time(runs["1 process"])
    rows = [f"model: {base['param_bytes'] / 2**20:.1f} MiB of parameters, {base['optim_bytes'] / 2**20:.1f} MiB of "
            f"AdamW state in one process; {args.steps} steps, median of steps {WARMUP + 1}-{args.steps}",
            f"{'run':12s} {'step time / 1 process':>22s} {'params per rank / all':>22s} "
            f"{'optim state per rank / all':>27s}"]
    for name, results in runs.items():
        worst_params = max(r["param_bytes"] for r in results) / base["param_bytes"]
        worst_optim = max(r["optim_bytes"] for r in results) / base["optim_bytes"]
        rows.append(f"{name:12s} {step_time(results) / t1:22.2f} {worst_params:22.3f} {worst_optim:27.3f}")
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
