"""LoRA through PEFT on EveForCausalLM: what is adapted, adapter-only saving, exact merging."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

from eve_vlm import EveForCausalLM  # noqa: E402
from eve_vlm.processing.processor import EveProcessor  # noqa: E402
from eve_vlm.testing import make_tiny_checkpoint  # noqa: E402
from eve_vlm.train.lora import LoraError, LoraSpec, apply_lora, merge_lora, target_pattern  # noqa: E402


@pytest.fixture(scope="module", params=["v1", "v2"])
def folder(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)


def _batch(folder):
    from PIL import Image

    processor = EveProcessor.from_pretrained(folder)
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
             {"role": "assistant", "content": a}] for q, a in [("What colour?", "red"), ("What shape?", "a circle")]]
    prompts = [processor.apply_chat_template(m, add_generation_prompt=False) for m in msgs]
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 32), "blue")]
    inputs = processor(text=prompts, images=images, padding_side="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100).masked_fill(inputs["input_ids"] < 0, -100)
    return inputs, labels


def test_default_targets_are_decoder_projections_and_v2_vision_copies(folder):
    model = EveForCausalLM.from_pretrained(folder)
    names = [n for n, _ in model.named_modules() if re.fullmatch(target_pattern(model, LoraSpec()), n)]
    layers = model.config.num_hidden_layers
    copies = 2 if model.config.modality_experts else 1
    assert len(names) == layers * 7 * copies
    assert all(n.startswith("model.layers.") for n in names)
    assert any("moe_" in n for n in names) == model.config.modality_experts
    only_q = [n for n, _ in model.named_modules() if re.fullmatch(target_pattern(model, LoraSpec(target_modules=["q_proj"], vision_copies=False)), n)]
    assert len(only_q) == layers and all(n.endswith(".q_proj") for n in only_q)
    with pytest.raises(LoraError, match="unknown lora.target_modules"):
        LoraSpec(target_modules=["qkv"])


def test_tiny_lora_lowers_loss_saves_only_adapter_and_merges_exactly(folder, tmp_path):
    torch.manual_seed(0)
    model = EveForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0, modules_to_save=["model.vision_tower"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    inputs, labels = _batch(folder)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    peft_model.train()
    losses = []
    for _ in range(12):
        loss = peft_model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.9
    peft_model.eval()
    for k, v in peft_model.get_base_model().state_dict().items():  # the base weights did not move
        key = k.replace(".base_layer", "")
        if "lora_" not in k and "modules_to_save" not in k and "original_module" not in k and key in base_state:
            assert torch.equal(v, base_state[key]), k

    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k or "vision_tower" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) < sum(v.numel() for v in base_state.values()) / 2

    with torch.no_grad():
        want = peft_model(**inputs).logits
    merged_dir = merge_lora(folder, tmp_path / "adapter", tmp_path / "merged")
    merged = EveForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert set(merged.state_dict()) == set(base_state)
    with torch.no_grad():
        got = merged(**inputs).logits
    # fp32 rounding of W + BA vs Wx + B(Ax): logits of this random model reach ~1e2, so 1e-5 relative
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (merged_dir / "tokenizer.json").is_file() or any(merged_dir.glob("tokenizer*"))
