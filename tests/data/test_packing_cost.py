"""What a batch costs: padding waste and attention work spent vs needed, from the collators to
the training metrics log."""

from __future__ import annotations

import json

import pytest
import torch

from eve_vlm.data import collate_packed, collate_padded, pack_examples
from eve_vlm.data.batching import batch_cost, causal_pairs
from eve_vlm.data.dataset import Example
from eve_vlm.train import Recipe, Trainer
from eve_vlm.train.catalog import recipes_root


def example(i: int, text: int, image_tokens: int | None = None) -> Example:
    ids = torch.arange(3, 3 + text)
    images, counts = [], []
    if image_tokens is not None:
        ids = torch.cat([ids[:1], torch.tensor([-200]), ids[1:]])
        images, counts = [torch.zeros(3, 16, 16)], [image_tokens]
    return Example(ids, ids.clone(), images, counts, index=i, id=f"e{i}")


def test_cost_of_padded_and_packed_batches():
    exs = [example(0, 10, 30), example(1, 20), example(2, 5, 5)]  # spliced: 40, 20, 10
    padded = collate_padded(exs, pad_id=0)["stats"]
    needed = causal_pairs(40) + causal_pairs(20) + causal_pairs(10)
    assert padded == {"tokens": 70, "slots": 120, "attn_pairs_needed": needed,
                      "attn_pairs_spent": 3 * causal_pairs(40)}
    rows = pack_examples(exs, max_length=60)
    assert [[ex.spliced_length for ex in r] for r in rows] == [[40, 20], [10]]
    packed = collate_packed(rows, pad_id=0)["stats"]
    # document attention: spent == needed; the second row is padding to 60
    assert packed == {"tokens": 70, "slots": 120, "attn_pairs_needed": needed, "attn_pairs_spent": needed}
    assert batch_cost([], packed=True) == {"tokens": 0, "slots": 0, "attn_pairs_needed": 0, "attn_pairs_spent": 0}


@pytest.mark.slow
def test_metrics_log_reports_padding_waste_and_attention_spent_over_needed(tmp_path):
    for pack in ("true", "false"):
        out = tmp_path / pack
        recipe = Recipe.load(recipes_root() / "tiny" / "eve_v2" / "1_vision.yaml",
                             [f"output_dir={out}", f"data.pack={pack}", "max_steps=2", "data.generated_samples=16"])
        Trainer.from_recipe(recipe, progress=False).train()
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [m for m in metrics if "lm_loss" in m]
        assert len(steps) == 2
        for m in steps:
            assert 0 <= m["padding_waste"] < 1
            if pack == "true":
                assert m["attn_spent_over_needed"] == 1.0
            else:
                assert m["attn_spent_over_needed"] >= 1.0
