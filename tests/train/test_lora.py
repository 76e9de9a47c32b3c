"""LoRA through PEFT on EveForCausalLM: what is adapted, the recipe's `lora:` section in the
trainer (adapter-only checkpoints, exact resume), `eve merge-lora`, and plain `get_peft_model`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

from eve_vlm import EveForCausalLM  # noqa: E402
from eve_vlm.cli import main as eve_main  # noqa: E402
from eve_vlm.processing.processor import EveProcessor  # noqa: E402
from eve_vlm.testing import make_tiny_checkpoint  # noqa: E402
from eve_vlm.train import Recipe, RecipeError, Trainer, latest_checkpoint  # noqa: E402
from eve_vlm.train.catalog import recipes_root  # noqa: E402
from eve_vlm.train.lora import LoraSpec, apply_lora, merge_lora, target_pattern  # noqa: E402

torch.set_num_threads(1)


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
    with pytest.raises(RecipeError, match="unknown lora.target_modules"):
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


# ---------------------------------------------------------------------- the recipe's lora section
def test_lora_section_is_strictly_parsed_and_off_by_default(tmp_path):
    assert Recipe.from_dict({}).lora is None
    assert Recipe.from_dict({"lora": None}).lora is None
    on = Recipe.from_dict({"lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}})
    assert (on.lora.r, on.lora.alpha, on.lora.dropout, on.lora.target_modules) == (8, 16.0, 0.1, ["q_proj", "v_proj"])
    assert Recipe.from_dict(json.loads(json.dumps(on.to_dict()))) == on  # recipe.json round trip
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    assert Recipe.load(path, ["lora.r=4"]).lora == LoraSpec(r=4)  # any stage: one override turns it on
    for bad, message in [
        ({"rank": 8}, "unknown recipe keys in lora"),
        ({"r": 0}, "lora.r must be >= 1"),
        ({"r": "8"}, "lora.r must be an integer"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"target_modules": ["qkv_proj"]}, "unknown lora.target_modules"),
        ({"target_modules": "q_proj"}, "must be a list"),
    ]:
        with pytest.raises(RecipeError, match=message):
            Recipe.from_dict({"lora": bad})


def _tiny_lora_recipe(out: Path, *overrides: str) -> Recipe:
    return Recipe.load(recipes_root() / "tiny/eve_v2/3_sft_lora.yaml",
                       [f"output_dir={out}", "max_steps=6", "save_every=2", "data.generated_samples=48", *overrides])


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    return load_file(str(folder / "adapter_model.safetensors"))


def _dcp_model_keys(folder: Path) -> list[str]:
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(folder / "dcp")).read_metadata().state_dict_metadata
    return [k for k in meta if k.startswith("model.")]


@pytest.mark.slow
def test_tiny_lora_sft_trains_adapters_only_checkpoints_them_resumes_and_merges(tmp_path):
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    a = Trainer.from_recipe(_tiny_lora_recipe(a_out), progress=False)
    base = a.model.get_base_model()
    frozen = {k: v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}
    trained = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert any(".moe_" in n for n in trained)  # v2: the vision copies get adapters too
    result = a.train()
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items() if k in frozen)

    # periodic checkpoints and final/ hold the adapter only: PEFT's files, and a DCP of what trains
    for folder in (a_out / "checkpoints/step-2", a_out / "checkpoints/step-4", a_out / "final"):
        saved = _adapter_tensors(folder)
        assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]
    for step in (2, 4):
        keys = _dcp_model_keys(a_out / f"checkpoints/step-{step}")
        assert keys and all("lora_" in k for k in keys), keys[:5]

    # killed after step 5 and resumed from step 4: the same adapter as the uninterrupted run
    Trainer.from_recipe(_tiny_lora_recipe(b_out), progress=False).train(stop_after=5)
    assert latest_checkpoint(b_out) == b_out / "checkpoints/step-4"
    resumed = Trainer.from_recipe(_tiny_lora_recipe(b_out), progress=False)
    resumed.train(resume=True)
    assert resumed.state.step == 6
    want, got = _adapter_tensors(a_out / "final"), _adapter_tensors(b_out / "final")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)

    # `eve merge-lora BASE ADAPTER OUT`: a plain model whose logits equal the adapter model's
    init = a_out / "init-tiny"
    assert eve_main(["merge-lora", str(init), str(a_out / "final"), str(tmp_path / "merged")]) == 0
    merged = EveForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    adapter_model = peft.PeftModel.from_pretrained(EveForCausalLM.from_pretrained(init, dtype=torch.float32),
                                                   str(a_out / "final")).eval()
    inputs, _ = _batch(init)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapter_model(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert EveProcessor.from_pretrained(tmp_path / "merged") is not None


@pytest.mark.slow
def test_lora_works_for_a_v1_stage_with_a_teacher_and_full_vision_training(tmp_path):
    """Any stage: v1 stage 1 trains its patch embedding (PEFT modules_to_save) and its aligning
    layer in full next to adapters on the decoder; final/ saves the adapters and the patch
    embedding (the aligning layer is training-only), and merges into a whole model."""
    recipe = Recipe.load(recipes_root() / "tiny/eve_v1/1_prealign.yaml",
                         [f"output_dir={tmp_path}", "max_steps=2", "lora.r=4", "data.generated_samples=16"])
    trainer = Trainer.from_recipe(recipe, progress=False)
    assert set(recipe.trainable) & {"vision", "aligner"}
    groups = set(trainer.parts.groups)
    assert {"lora", "vision", "aligner"} <= groups
    result = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert "aligning_loss" in result.history[0]
    saved = _adapter_tensors(tmp_path / "final")
    assert any("lora_" in k for k in saved) and any("vision_tower." in k for k in saved)
    assert not any("vision_tower_compressor" in k or k.endswith("q_proj.weight") for k in saved), sorted(saved)
    init = tmp_path / "init-tiny"
    assert eve_main(["merge-lora", str(init), str(tmp_path / "final"), str(tmp_path / "merged")]) == 0
    merged = EveForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    base = EveForCausalLM.from_pretrained(init).state_dict()
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert any(k.startswith("model.vision_tower.") for k in changed) and any(".q_proj." in k for k in changed)


def test_lora_keeps_frozen_layers_free_of_adapters(folder):
    model = EveForCausalLM.from_pretrained(folder)
    peft_model = apply_lora(model, LoraSpec(r=2), frozen=["model.layers.0.*"])
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.get_base_model().named_parameters() if ".lora_A." in n}
    assert adapted and not any(n.startswith("model.layers.0.") for n in adapted)


def test_get_peft_model_directly_on_eve_trains_a_step(folder):
    """Users with their own loop: plain PEFT on EveForCausalLM, no eve_vlm LoRA helpers."""
    torch.manual_seed(0)
    model = EveForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    b_before = {n: p.detach().clone() for n, p in trainable.items() if "lora_B" in n}
    inputs, labels = _batch(folder)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    loss = peft_model(**inputs, labels=labels).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(trainable[n], b) for n, b in b_before.items())  # lora_B left zero
    with torch.no_grad():
        assert float(peft_model(**inputs, labels=labels).loss) != float(loss)


def test_lora_with_the_vision_group_keeps_an_encoder_based_models_encoder_frozen(tmp_path):
    """The vision tower trains in full as a PEFT module to save; the pretrained encoder inside it
    stays frozen unless the recipe names the group `encoder`."""
    from eve_vlm.model.encoder_vision import load_pretrained_encoder
    from eve_vlm.train.lora import attach_lora

    folder = make_tiny_checkpoint(tmp_path / "enc", "v2", seed=3, vision="encoder", modality_experts=False)
    model = EveForCausalLM.from_pretrained(folder)
    load_pretrained_encoder(model)
    _, groups = attach_lora(model, LoraSpec(r=2), ["vision", "llm"], [])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".projector." in n for n in trained) and any("lora_" in n for n in trained)
    assert not any(".vision_tower.encoder." in n or ".vision_tower.modules_to_save.default.encoder." in n for n in trained)
    assert "encoder" not in groups
    model2 = EveForCausalLM.from_pretrained(folder)
    _, groups2 = attach_lora(model2, LoraSpec(r=2), ["vision", "llm", "encoder"], [])
    assert any(".encoder." in n for n, p in model2.named_parameters() if p.requires_grad)
