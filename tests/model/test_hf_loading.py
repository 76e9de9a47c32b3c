"""Loading big checkpoints: sharded safetensors stream into a model built on the meta device.

bench/load_memory.py measures the memory (one copy of the weights); this test pins the property
behind it without measuring RSS: the model is constructed exactly once, with no parameter
materialised before the weights arrive, and every shard's tensors land in place.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eve_vlm import EveForCausalLM


@pytest.fixture(scope="module")
def sharded(tiny_v2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    model = EveForCausalLM.from_pretrained(tiny_v2_dir)
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loader", [EveForCausalLM, AutoModelForCausalLM], ids=["ours", "auto"])
def test_sharded_bf16_load_builds_the_model_once_on_meta(sharded, loader, monkeypatch):
    folder, reference = sharded
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    assert (folder / "model.safetensors.index.json").is_file()

    built: list[set[str]] = []
    post_init = EveForCausalLM.post_init

    def spy(self: EveForCausalLM) -> None:
        built.append({p.device.type for p in self.parameters()})
        post_init(self)

    monkeypatch.setattr(EveForCausalLM, "post_init", spy)
    model = loader.from_pretrained(
        folder, torch_dtype=torch.bfloat16, device_map="auto", low_cpu_mem_usage=True
    )
    assert built == [{"meta"}]  # one construction, and no full-size random init on a real device
    state = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
