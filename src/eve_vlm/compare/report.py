"""compare.json -> report.md and the two plots (accuracy vs training FLOPs, vs training seconds)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import MODELS

logger = logging.getLogger(__name__)

LABELS = {"eve_v1": "EVE v1 (encoder-free)", "eve_v2": "EVEv2 (encoder-free)", "encoder": "encoder-based (EfficientNet-Lite0)"}


def plot_curves(runs: list[dict[str, Any]], out: Path) -> list[str]:
    """accuracy_vs_flops.png (the FLOPs-budget runs) and accuracy_vs_seconds.png (the wall-budget
    runs), one line per model and data fraction; [] without matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'eve-vlm[plot]'): no plots")
        return []
    written = []
    for budget, key, name, xlabel in (("flops", "train_flops", "accuracy_vs_flops.png", "training FLOPs"),
                                      ("wall", "train_seconds", "accuracy_vs_seconds.png", "training seconds")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for run in runs:
            if run["budget"] != budget:
                continue
            xs = [p[key] for p in run["curve"]]
            ys = [100 * p["accuracy"] for p in run["curve"]]
            style = ["-", "--", ":"][MODELS.index(run["model"])]
            ax.plot(xs, ys, style, marker="o", label=f"{LABELS[run['model']]}, data {run['data_fraction']:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{budget} budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_report(summary: dict[str, Any], out: Path, plots: list[str]) -> None:
    grid = summary["grid"]
    runs = summary["runs"]
    lines = [
        "# eve compare: encoder-free vs encoder-based at equal training compute",
        "",
        f"Command: `{summary['command'] or 'eve compare'}` (seed {summary['seed']}); "
        f"{summary['wall_seconds'] / 60:.1f} min in all on {summary['machine']['platform']} "
        f"({summary['machine']['threads']} threads, torch {summary['machine']['torch']}).",
        "",
        f"Budgets per run: **{grid['flops_budget']:.3g} training FLOPs** (FLOPs budget) or "
        f"**{grid['wall_budget_seconds']:.0f} training seconds** (wall budget); held-out accuracy on "
        f"{grid['eval_questions']} held-out test questions, greedy. Training images: "
        + ", ".join(f"{f:g}" for f in grid["data_fractions"]) + f" of {grid['train_images']}.",
        "",
        "## Accuracy at the end of each budget",
        "",
        "| data | budget | model | overall | colour | shape | yes/no | training FLOPs | training s | steps | inference FLOPs / answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: (r["data_fraction"], r["budget"], MODELS.index(r["model"]))):
        per = run["per_type"]
        note = "" if run.get("wall_budget_reached", True) else " (wall budget not reached)"
        lines.append(
            f"| {run['data_fraction']:g} ({run['train_images']} images) | {run['budget']}{note} | {LABELS[run['model']]} | "
            f"**{pct(run['accuracy'])}** | {pct(per.get('color'))} | {pct(per.get('shape'))} | {pct(per.get('yes_no'))} | "
            f"{run['train_flops']:.3g} | {run['train_seconds']:.0f} | {run['steps']} | {run['inference_flops_per_answer']:.3g} |"
        )
    lines += ["", "## Curves", ""]
    lines += [f"![{p}]({p})" for p in plots] or ["(no plots: matplotlib is not installed)"]
    lines += ["", "| data | budget | model | points (training FLOPs, training s: accuracy) |", "|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r["data_fraction"], r["budget"], MODELS.index(r["model"]))):
        pts = "; ".join(f"{p['train_flops']:.3g}, {p['train_seconds']:.0f} s: {pct(p['accuracy'])}" for p in run["curve"])
        lines.append(f"| {run['data_fraction']:g} | {run['budget']} | {run['model']} | {pts} |")
    lines += ["", "## Cost per training row (FLOPs, compare/flops.py)", ""]
    seen = set()
    for run in runs:
        key = (run["model"], run["data_fraction"])
        if key in seen:
            continue
        seen.add(key)
        c = run["cost"]
        parts = lambda d: ", ".join(f"{k} {v:.3g}" for k, v in d.items() if v)  # noqa: E731
        lines.append(
            f"- {run['model']}, data {run['data_fraction']:g}: {c['visual_tokens']} visual tokens; alignment "
            f"{c['align_steps']} steps of {c['align_step']:.3g} ({parts(c['align_row_parts'])} per row); "
            f"fine-tuning steps of {c['sft_step']:.3g} ({parts(c['sft_row_parts'])} per row)"
        )
    lines += ["", "Each run's fine-tuned model (trained to the later of its two budgets): "
              + ", ".join(f"`{v}`" for v in summary["models"].values()), ""]
    (out / "report.md").write_text("\n".join(lines))
