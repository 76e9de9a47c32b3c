"""bench/packed_attention.py keeps running: its whole report at toy size, in bf16 autocast (the
precision of its GPU command) and with two mixes per row. Timings are read by people, never asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "packed_attention.py"


@pytest.mark.skipif(not SCRIPT.exists(), reason="no bench scripts next to the package (installed from a wheel)")
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
