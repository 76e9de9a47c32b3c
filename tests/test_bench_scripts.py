"""The bench scripts that a GPU session runs unseen keep working: the packed-attention report at toy
size, in bf16 autocast (its GPU precision) and with two mixes per row, and the GPU check's refusal
where no GPU is visible. Timings are read by people, never asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "packed_attention.py"
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"
needs_bench = pytest.mark.skipif(not SCRIPT.exists(), reason="no bench scripts next to the package (a wheel install)")


@needs_bench
def test_packed_attention_bench_reports_every_variant():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = ["--hidden", "64", "--layers", "1", "--reps", "1", "--versions", "v2", "--dtype", "bf16", "--copies", "2"]
    out = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = out.stdout
    assert "one packed row of 1904" in report  # two mixes of the four sizes: 2 x (275 + 219 + 233 + 225)
    for row in ("(a) padded rows", "(b) packed, dense mask", "(c) packed, document attention (segments)",
                "sum of per-sample attention", "v2 train step (c) vs (a)", "v2 attention (c) / per-sample sum"):
        assert row in report, report
    bad = subprocess.run([sys.executable, str(SCRIPT), "--copies", "0"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--copies must be at least 1" in bad.stderr


@needs_bench
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_stops_with_a_clear_message_where_no_gpu_is_visible(tmp_path):
    out = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA GPU visible" in out.stderr
    assert not list(tmp_path.iterdir())  # no step ran
