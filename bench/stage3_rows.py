"""What one stage-3 question costs on this machine: one question per row, against a row per image
whose questions are independent turns sharing the image prefix (and, for the blind baseline, whose
blank images are all the same, rows merged where that does not lengthen the batch's longest row).

Why: the quickstart's yes/no answers need ~13-19k stage-3 questions before they leave the answer
prior. The image prefix is 25 of a single question's ~39 tokens, so sharing it is the cheapest way
to more questions per minute. Builds the quickstart's model
(SmolLM2 layers 0-1, 28-29; no training needed for timing) and times full training steps
(forward, backward, AdamW) of the quickstart's stage-3 recipe; prints ms per question and ratios
measured in this one run.

    python bench/stage3_rows.py            # about 2 minutes on two cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from eve_vlm.constants import IGNORE_INDEX
from eve_vlm.quickstart.assets import smollm2_hf_folder
from eve_vlm.quickstart.run import QuickstartConfig, build_model, stage_recipe, write_data
from eve_vlm.train import Trainer


def time_layout(folder: Path, cfg: QuickstartConfig, data_key: str, rows: int, steps: int) -> tuple[float, float]:
    """(ms per question, spliced tokens per question) over `steps` timed steps after two warm-up steps."""
    model, processor = build_model(smollm2_hf_folder(), cfg)
    data = write_data(folder / "data", cfg)
    recipe = stage_recipe("3_sft", cfg, [f"output_dir={folder / 'out'}", f"data.path={data[data_key]}", "max_steps=100",
                                     f"global_batch_size={rows}", f"micro_batch_size={rows}"])
    trainer = Trainer.from_recipe(recipe, model=model, processor=processor, progress=False)
    optimizer = trainer.parts.optimizer
    for _ in range(2):
        trainer.train_step()
    questions = tokens = 0
    seconds = 0.0
    for _ in range(steps):
        batch = trainer.batches.next()
        t = time.perf_counter()
        out = trainer.forward(batch)
        out.lm_loss_sum.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t
        labels = batch["labels"]
        # one question = one answer span: a supervised token whose predecessor is not supervised
        questions += int(((labels[:, 1:] != IGNORE_INDEX) & (labels[:, :-1] == IGNORE_INDEX)).sum())
        tokens += int(out.valid.sum())
    return 1000 * seconds / questions, tokens / questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    layouts = [
        ("one question per row (32 rows)", dict(questions_per_sample=1), "qa", 32),
        ("an image's questions share its prefix (4 rows)", {}, "qa", 4),
        ("blind: identical blank prefixes (4 records)", {}, "qa_blind", 4),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kw, key, rows) in enumerate(layouts):
            ms, tok = time_layout(Path(tmp) / str(i), QuickstartConfig(**kw), key, rows, args.steps)
            results.append((name, ms, tok))
    base = results[0][1]
    print(f"{'stage-3 layout':50s} {'ms/question':>12s} {'tokens/question':>16s} {'speed-up':>9s}")
    for name, ms, tok in results:
        print(f"{name:50s} {ms:12.1f} {tok:16.1f} {base / ms:8.2f}x")


if __name__ == "__main__":
    main()
