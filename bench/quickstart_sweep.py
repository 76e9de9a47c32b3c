"""Run many quickstart configurations side by side (a GPU runs several at once) and print a table.

Why: on the 2-core CPU one quickstart takes 15 minutes; on a GPU the same steps take about a minute,
so recipe questions (learning rates, stage lengths, data layout) are answered by sweeping there at
the CPU's step counts. fp32 without TF32 by default, so the numbers transfer to the CPU recipe.

    python bench/quickstart_sweep.py bench/quickstart_sweeps/scaling.json --parallel 5 --out /tmp/sweep

A config file is a JSON list of {"name": ..., "cfg": {QuickstartConfig fields}, "env": {optional
environment variables}}; `overrides` are
recipe overrides ("[STAGE:]key=value", as `eve quickstart --set`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, logging, sys
from pathlib import Path
import torch
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
logging.basicConfig(level=logging.WARNING)
from eve_vlm.quickstart.run import QuickstartConfig, run_quickstart
kw = json.loads(sys.argv[1])
kw["out"] = Path(kw["out"])
for key in ("keep_layers", "overrides", "skip_stages"):
    if key in kw:
        kw[key] = tuple(kw[key])
run_quickstart(QuickstartConfig(**kw))
"""


def launch(entry: dict, out: Path, precision: str) -> subprocess.Popen:
    kw = {"blind": False, "fit_budget": False, **entry["cfg"], "out": str(out / entry["name"])}
    kw["overrides"] = [f"precision={precision}", *kw.get("overrides", [])]
    log = (out / f"{entry['name']}.log").open("w")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), **entry.get("env", {}))
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(kw)], stdout=log, stderr=subprocess.STDOUT, env=env)


def summary(name: str, folder: Path) -> str:
    try:
        m = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as err:
        return f"{name:24s} FAILED ({err}); see {folder}.log"
    pt, ts = m["per_type"], m["timings_seconds"]
    stages = " ".join(f"{k}={v:.0f}s" for k, v in ts.items() if k[0].isdigit())
    return (
        f"{name:24s} {100 * m['accuracy']:5.1f} | colour {100 * pt['color']:5.1f} shape {100 * pt['shape']:5.1f} "
        f"yes/no {100 * pt['yes_no']:5.1f} | {stages}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", type=Path)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "auto", "bf16"])
    args = ap.parse_args()
    entries = json.loads(args.configs.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    pending, running, t0 = list(entries), [], time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            entry = pending.pop(0)
            running.append((launch(entry, args.out, args.precision), entry["name"]))
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"[{time.time() - t0:5.0f}s] {summary(name, args.out / name)}", flush=True)


if __name__ == "__main__":
    main()
