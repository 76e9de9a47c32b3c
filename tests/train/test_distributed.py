"""Several CPU processes (torchrun, gloo) train exactly like one process with the same global batch.

1 process x micro 4 x accumulation 2 == 2 processes x micro 4 x accumulation 1, under DDP and FSDP2,
for a v1 stage (aligning layer and frozen teacher) and a v2 stage (text weights frozen, their
vision copies training). This holds only if every global step trains on the same 8 records whatever
the world size; the trainer reads one globally shuffled record order and gives rank r every n-th
record of it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eve_vlm
from eve_vlm.train import Recipe, Trainer

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(eve_vlm.__file__).resolve().parents[1]  # the workers import the package this test imported
V1, V2 = "tiny/eve_v1/1_prealign", "tiny/eve_v2/1_vision"
# fp32 on CPU; what differs is only the order of floating-point sums (gradient all-reduce and
# reduce-scatter, the global-norm reduction), a few ulps per step
RTOL, ATOL = 1e-5, 1e-6
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun_cmd(nproc: int, recipe: str, out: Path, *overrides: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", "eve_vlm.cli", "train", recipe, "--set", f"output_dir={out}"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def torchrun(nproc: int, recipe: str, out: Path, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(_torchrun_cmd(nproc, recipe, out, *overrides, resume=resume), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def one_process(recipe: str, out: Path, *overrides: str, resume: bool = False) -> Trainer:
    trainer = Trainer.from_recipe(Recipe.load(recipe, [f"output_dir={out}", *overrides]), progress=False)
    trainer.train(resume=resume)
    return trainer


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_run(a: Path, b: Path, steps: int) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == steps
    for step, (x, y) in enumerate(zip(la, lb, strict=True), 1):
        assert y == pytest.approx(x, rel=RTOL, abs=ATOL), f"step {step}: {a.name} {x}, {b.name} {y}"
    wa = load_file(str(a / "final/model.safetensors"))
    wb = load_file(str(b / "final/model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [V1, V2])
def test_two_processes_ddp_and_fsdp2_match_one_process(tmp_path: Path, recipe: str) -> None:
    steps = ["max_steps=6", "micro_batch_size=4", "global_batch_size=8"]
    one = tmp_path / "one"
    one_process(recipe, one, *steps)
    for strategy in ("ddp", "fsdp"):
        two = tmp_path / strategy
        torchrun(2, recipe, two, *steps, f"distributed={strategy}")
        assert_same_run(one, two, 6)
        summary = json.loads((two / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["samples"] == 48
