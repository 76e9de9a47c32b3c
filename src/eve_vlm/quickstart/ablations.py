"""`eve quickstart --ablations`: the paper's two recipe ablations at equal compute, on easy-VQA.

(a) the full recipe, (b) without stage 1 (its steps go to stage 2 instead), (c) without the patch
aligning layer's teacher loss. Each run is a complete quickstart without the blind baseline; the
stage-2 loss curves share one plot and the accuracies one table.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from .run import QuickstartConfig, run_quickstart, stage_recipe

logger = logging.getLogger(__name__)

ABLATIONS: dict[str, str] = {
    "full": "(a) full recipe: stage 1 pre-aligning with the teacher, stage 2, stage 3",
    "no_prealign": "(b) without stage 1: its steps are given to stage 2",
    "no_teacher": "(c) without the aligning layer's teacher loss (stage 1 trains on captions only)",
}


def ablation_configs(cfg: QuickstartConfig) -> dict[str, QuickstartConfig]:
    base = replace(cfg, blind=False, fit_budget=False)  # equal compute, whatever the wall time
    prealign_steps = stage_recipe("1_prealign", replace(base, steps_scale=1.0), []).max_steps
    return {
        "full": replace(base, out=cfg.out / "full"),
        "no_prealign": replace(
            base, out=cfg.out / "no_prealign", skip_stages=("1_prealign",), extra_steps={"2_pretrain": prealign_steps}
        ),
        "no_teacher": replace(base, out=cfg.out / "no_teacher", no_teacher=True),
    }


def _stage_losses(folder: Path) -> list[tuple[int, float]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r.get("lm_loss", r["loss"]))) for r in rows]


def run_ablations(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run the three variants one after another; write ablations.{md,json,png} under cfg.out."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, sub in ablation_configs(cfg).items():
        logger.info("ablation %s: %s", name, ABLATIONS[name])
        metrics = run_quickstart(sub)
        results[name] = {
            "accuracy": metrics["accuracy"],
            "per_type": metrics["per_type"],
            "wall_seconds": metrics["wall_seconds"],
            "stage2_lm_loss": _stage_losses(sub.out / "2_pretrain"),
            "stage3_final_loss": (_stage_losses(sub.out / "3_sft") or [(0, float("nan"))])[-1][1],
        }
    (cfg.out / "ablations.json").write_text(json.dumps(results, indent=2))
    plot_stage2(results, cfg.out / "ablations.png")
    (cfg.out / "ablations.md").write_text(ablation_table(results))
    return results


def plot_stage2(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, res in results.items():
        steps = [s for s, _ in res["stage2_lm_loss"]]
        ax.plot(steps, [v for _, v in res["stage2_lm_loss"]], label=ABLATIONS[name].split(":")[0])
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("caption LM loss")
    ax.set_yscale("log")
    ax.set_title("Stage 2 (generative pre-training) loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablation_table(results: dict[str, Any]) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        "| variant | overall | colour | shape | yes/no | stage-2 loss, first 10 / last 10 steps | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        losses = [v for _, v in res["stage2_lm_loss"]]
        head = sum(losses[:10]) / max(len(losses[:10]), 1)
        tail = sum(losses[-10:]) / max(len(losses[-10:]), 1)
        per = res["per_type"]
        lines.append(
            f"| {ABLATIONS[name]} | {pct(res['accuracy'])} | {pct(per['color'])} | {pct(per['shape'])} | "
            f"{pct(per['yes_no'])} | {head:.3f} / {tail:.3f} | {res['wall_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"
