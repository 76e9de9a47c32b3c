"""Redraw docs/ablations.png from the ablations.json files in this folder: python docs/ablations/plot.py"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
NAMES = {"full": "(a) full", "no_prealign": "(b) no stage 1", "no_teacher": "(c) no teacher"}
PANELS = [
    ([f"h100_four_question_recipe_seed{s}.json" for s in range(3)], "4 questions a sample, 30/120/60 steps,\nH100, seeds 0-2 (mean, min-max)"),
    (["cpu_four_question_recipe_half_steps_seed0.json"], "4 questions a sample,\n2-core CPU, half the steps"),
    (["cpu_single_question_recipe_half_steps_seed0.json"], "1 question a sample, 45/180/195 steps,\n2-core CPU, half the steps"),
    ([f"h100_long_stage1_recipe_seed{s}.json" for s in range(2)], "long stage 1 + GELU, 360/180/150 steps,\nH100 at CPU steps, seeds 0-1"),
    (["cpu_900_step_recipe_seed0.json"], "360/180/900 steps (the quickstart's stages,\nno dialogues), 2-core CPU, seed 0"),
]

fig, axes = plt.subplots(1, len(PANELS), figsize=(4.5 * len(PANELS), 3.8), sharey=True)
for ax, (files, title) in zip(axes, PANELS, strict=True):
    runs = [json.loads((HERE / f).read_text()) for f in files]
    for key, label in NAMES.items():
        curves = [np.array(r[key]["stage2_lm_loss"]) for r in runs]
        n = min(len(c) for c in curves)
        ys = np.stack([c[:n, 1] for c in curves])
        (line,) = ax.plot(curves[0][:n, 0], ys.mean(0), label=label)
        if len(curves) > 1:
            ax.fill_between(curves[0][:n, 0], ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("stage-2 step")
    ax.set_title(title, fontsize=10)
    ax.legend()
axes[0].set_ylabel("stage-2 LM loss")
fig.tight_layout()
fig.savefig(HERE.parent / "ablations.png", dpi=100)
