"""`eve plan`: FSDP2 shard sizes read from a meta-device model under the fake process group."""

from __future__ import annotations

import pytest

from eve_vlm.model import EveConfig
from eve_vlm.train import Recipe
from eve_vlm.train.plan import make_plan, measure_shards, parse_memory


def mid_config() -> EveConfig:
    # a 28-layer v2 decoder of width 512: mid-size, odd shapes that FSDP2 must pad
    return EveConfig(version="v2", modality_experts=True, vocab_size=5003, hidden_size=512, intermediate_size=1376,
                     num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, attention_bias=True)


def test_shards_of_every_rank_sum_to_the_full_model() -> None:
    cfg = mid_config()
    ranks = [measure_shards(cfg, ["vision", "experts"], [], world=4, rank=r) for r in range(4)]
    total, trainable = ranks[0].total_params, ranks[0].total_trainable
    assert sum(s.local_params for s in ranks) == total
    assert sum(s.local_trainable for s in ranks) == trainable
    assert 0 < trainable < total  # the text weights are frozen in this stage
    assert ranks[0].local_params == max(s.local_params for s in ranks)  # rank 0 is the one to plan for
    assert ranks[0].local_params <= total / 4 * 1.05


def test_plan_of_the_released_v2_stage_shards_about_one_nth() -> None:
    recipe = Recipe.load("eve_v2/1_vision")
    p8 = make_plan(recipe, "evev2-7b", 8)
    p32 = make_plan(recipe, "evev2-7b", 32)
    assert 13e9 < p8.shards.total_params < 16e9  # Qwen2.5-7B with its vision copies
    assert p8.params_gib / p32.params_gib == pytest.approx(4, rel=0.02)
    assert p8.act_ckpt_gib < p8.act_gib
    assert p8.total(True) < 80


def test_a_lora_recipe_is_refused_naming_the_way_to_plan_its_upper_bound() -> None:
    with pytest.raises(ValueError, match="LoRA adapters.*--set lora=null"):
        make_plan(Recipe.load("eve_v2/3_sft_lora"), "evev2-7b", 8)
    full = make_plan(Recipe.load("eve_v2/3_sft_lora", ["lora=null"]), "evev2-7b", 8)
    assert full.shards.total_trainable > 0


def test_memory_sizes_parse() -> None:
    assert parse_memory("80GiB") == 80 and parse_memory("141") == 141
    assert parse_memory("80GB") == pytest.approx(74.5, abs=0.1)
