"""Two CPU processes (torchrun, gloo, DDP) follow the same loss curve as one process with the same
global batch: 1 process x micro 4 x accumulation 2 == 2 processes x micro 4 x accumulation 1.

This holds only if every global step trains on the same 8 records whatever the world size; the
trainer reads one globally shuffled record order and gives rank r every n-th record of it.
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
RECIPE = "tiny/eve_v2/0_prealign"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    Trainer.from_recipe(Recipe.load(RECIPE, [f"output_dir={one}", "micro_batch_size=4"]), progress=False).train()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "eve_vlm.cli", "train", str(RECIPE),
        "--set", f"output_dir={two}", "--set", "micro_batch_size=4", "--set", "global_batch_size=8",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 12
    for step, (x, y) in enumerate(zip(a, b, strict=True), 1):
        assert y == pytest.approx(x, rel=1e-4), f"step {step}: 1 process {x}, 2 processes {y}"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples"] == 96 and summary["records_seen"] == 96
    # and the same weights at the end (DDP averages gradients; the optimizer steps agree)
    wa = load_file(str(one / "final/model.safetensors"))
    wb = load_file(str(two / "final/model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-5, msg=name)
