"""What running the last decoder layer only at target positions saves in a quickstart stage-3 step.

A training loss reads the final hidden states only where there is a target: in stage 3 an answer
and its end token, ~2 of a question's ~16 tokens. `EveForCausalLM.forward` (without logits) lets
the last layer write keys and values for every token but run its queries, output projection and
MLP on the target positions only (`decoder.QueryRows`). This times the quickstart's stage-3
training step (SmolLM2 layers 0-1 and 28-29, the first two frozen; forward + backward) both ways
on the same batches, alternating, and prints the ratio measured in this one run.

    python bench/last_layer_targets.py      # about a minute on two cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eve_vlm.constants import IGNORE_INDEX
from eve_vlm.model import next_token_targets
from eve_vlm.quickstart.assets import smollm2_hf_folder
from eve_vlm.quickstart.run import QuickstartConfig, build_model, stage_recipe, write_data
from eve_vlm.train import Trainer


def step_seconds(model, batch: dict, only_targets: bool) -> float:
    """One forward + backward of the LM loss, the last layer on every position or on the targets."""
    t = time.perf_counter()
    pixels = model.prepare_images(batch["images"])
    vision = model.model.encode_images(pixels)
    sp = model.splice(batch["input_ids"], vision, batch["attention_mask"], batch["labels"], None, "right",
                      batch.get("branch_ids"))
    targets = next_token_targets(sp)
    selected = targets != IGNORE_INDEX
    keep = F.pad(selected, (0, 1), value=False) if only_targets else None
    hidden, _ = model.model.run_layers(sp.embeds, sp.positions, sp.valid, branch_ids=sp.branches, keep=keep)
    h = hidden if only_targets else hidden[:, :-1][selected]
    F.cross_entropy(model.lm_head(h).float(), targets[selected], reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    cfg = QuickstartConfig()
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_model(smollm2_hf_folder(), cfg)
        data = write_data(Path(tmp) / "data", cfg)
        recipe = stage_recipe("3_sft", cfg, [f"output_dir={Path(tmp) / 'out'}", f"data.path={data['qa']}"])
        trainer = Trainer.from_recipe(recipe, model=model, processor=processor, progress=False)  # applies the freezing
        model = trainer.model.train()
        batches = [trainer.batches.next() for _ in range(args.steps + 2)]
    full, part = [], []
    for i, batch in enumerate(batches):
        a, b = step_seconds(model, batch, False), step_seconds(model, batch, True)
        if i >= 2:  # warm-up
            full.append(a)
            part.append(b)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    print(f"quickstart stage-3 step (4 images, ~{tokens:.0f} text tokens), forward + backward, {torch.get_num_threads()} threads")
    print(f"  last layer on every position : {1000 * statistics.median(full):7.1f} ms")
    print(f"  last layer on the targets    : {1000 * statistics.median(part):7.1f} ms")
    print(f"  ratio                        : {statistics.median(part) / statistics.median(full):7.2f}x")


if __name__ == "__main__":
    main()
