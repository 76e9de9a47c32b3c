"""How many stage-3 steps the quickstart's blind baseline needs before it stops improving.

The blind model answers from the question alone (every image is blank), so its ceiling is the
answer prior: the most common training answer of each question string. This trains it from the
converted LLM with the quickstart's stage-3 recipe on the blank-image records for `--steps` steps
and scores greedy answers on the held-out questions every `--every` steps, next to the answer prior.
The quickstart's `blind_steps` default (100) comes from this curve.

    python bench/blind_steps.py            # about 4 minutes on two cores
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from eve_vlm.quickstart.assets import smollm2_hf_folder
from eve_vlm.quickstart.run import (
    QuickstartConfig,
    build_model,
    evaluate,
    prior_accuracy,
    stage_recipe,
    write_data,
)
from eve_vlm.train import Trainer, TrainerCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=60)
    parser.add_argument("--eval-questions", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = QuickstartConfig(out=out, steps_scale=1.0, eval_questions=args.eval_questions, seed=args.seed)
        data = write_data(out / "data", cfg)
        model, processor = build_model(smollm2_hf_folder(), cfg)
        recipe = stage_recipe("3_sft", cfg, [f"output_dir={out / 'blind'}", f"data.path={data['qa_blind']}"])
        recipe.max_steps = args.steps
        rows: list[dict] = []
        scored: list[int] = []

        class ScoreEvery(TrainerCallback):
            """Greedy accuracy on the held-out questions every `--every` steps and at the end."""

            def on_step_end(self, trainer: Trainer, record: dict) -> None:
                step = trainer.state.step
                if step % args.every and step != trainer.max_steps:
                    return
                trainer.model.eval()
                result = evaluate(trainer.model, processor, cfg, blank=out / "data" / "blank.png")
                trainer.model.train()
                scored[:] = sorted(result["predictions"])
                rows.append({"step": step, "accuracy": result["accuracy"], **result["per_type"]})
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)

        trainer = Trainer.from_recipe(recipe, model=model, processor=processor, callbacks=[ScoreEvery()], progress=False)
        trainer.train()
        prior = prior_accuracy(cfg, scored)
    print(f"\nanswer prior on the same questions: {prior['accuracy']:.3f} {json.dumps(prior['per_type'])}")
    print("| blind steps | " + " | ".join(str(r["step"]) for r in rows) + " |")
    print("| overall | " + " | ".join(f"{100 * r['accuracy']:.1f}%" for r in rows) + " |")


if __name__ == "__main__":
    main()
