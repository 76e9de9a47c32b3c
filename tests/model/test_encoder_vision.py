"""The encoder-based baseline (vision="encoder"): a pretrained encoder + MLP projector into the EVE decoder."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

import eve_vlm  # noqa: F401  (registers the Auto classes)
from eve_vlm import EveConfig, EveForCausalLM
from eve_vlm.generate import GenerationConfig, answer, build_prompts, generate
from eve_vlm.model.config import ConfigError
from eve_vlm.model.encoder_vision import EncoderVision, load_pretrained_encoder
from eve_vlm.processing.processor import EveProcessor
from eve_vlm.testing import make_png, make_tiny_checkpoint, tiny_model_config
from eve_vlm.train import set_trainable

ENCODER = dict(vision="encoder", modality_experts=False)
# One intra-op thread, as tests/train does: EfficientNet's many small (depthwise) convolutions slow
# down by an order of magnitude when two threads share an oversubscribed machine.
torch.set_num_threads(1)


def _clip_folder(path, patch: int = 16):
    """A tiny random CLIP vision model saved as a local transformers folder (no download)."""
    torch.manual_seed(11)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=patch)
    CLIPVisionModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def effnet_folder(tmp_path_factory):
    """A tiny EVE v2 decoder with EfficientNet-Lite0 (stride 16, the installed ImageNet weights)."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("effnet"), "v2", seed=3, **ENCODER)
    model = EveForCausalLM.from_pretrained(folder)
    load_pretrained_encoder(model)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    clip = _clip_folder(root / "clip")
    folder = make_tiny_checkpoint(root / "eve", "v2", seed=4, vision_encoder=str(clip), **ENCODER)
    model = EveForCausalLM.from_pretrained(folder)
    load_pretrained_encoder(model)
    model.save_pretrained(folder)
    return folder


def _images(*sizes):
    return [torch.randn(3, h, w, generator=torch.Generator().manual_seed(h * 7 + w)) for h, w in sizes]


@pytest.mark.parametrize("which", ["effnet", "clip"])
def test_token_layout_matches_the_processor(which, effnet_folder, clip_folder):
    folder = effnet_folder if which == "effnet" else clip_folder
    model = EveForCausalLM.from_pretrained(folder)
    processor = EveProcessor.from_pretrained(folder)
    assert isinstance(model.model.vision_tower, EncoderVision)
    images = _images((64, 64), (32, 96), (96, 32))
    out = model.model.encode_images(images)
    assert out.grids == [(2, 2), (1, 3), (3, 1)]
    assert out.lengths == [processor.num_image_tokens(p) for p in images] == [7, 5, 7]
    assert out.tokens.shape == (sum(out.lengths), model.config.hidden_size)
    # CLS first, SPLIT closing every row: the learned embeddings, as in EVE's layout
    tower = model.model.vision_tower
    assert torch.equal(out.tokens[0], tower.class_embedding) and torch.equal(out.tokens[3], tower.split_embedding)
    # an image's tokens do not depend on the other images of the batch
    alone = model.model.encode_images(images[1:2]).tokens
    torch.testing.assert_close(out.tokens[7:12], alone, rtol=0, atol=1e-5)


def test_efficientnet_features_are_the_teachers(effnet_folder):
    """The encoder reuses the installed ImageNet EfficientNet-Lite0: same features as the teacher's stage."""
    from eve_vlm.model.teacher_efficientnet import EfficientNetTeacher

    model = EveForCausalLM.from_pretrained(effnet_folder)
    teacher = EfficientNetTeacher.from_installed("stride16")
    pixels = torch.rand(2, 3, 64, 64)
    tower = model.model.vision_tower
    clip_norm = (pixels - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    s = tower.merge_stride
    ours = tower.encode(clip_norm)  # processor-normalised pixels, renormalised inside
    want = teacher(teacher.normalize(pixels))  # [2, 4, 4, 112]
    want = want.reshape(2, 2, s, 2, s, -1).permute(0, 1, 3, 2, 4, 5).reshape(2, 2, 2, -1)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_is_self_contained(clip_folder, tmp_path):
    model = EveForCausalLM.from_pretrained(clip_folder)
    ids = torch.tensor([[5, 6, -200, 7, 8, 9]])
    images = _images((64, 96))
    before = model(ids, images=images).logits
    model.save_pretrained(tmp_path / "saved")
    EveProcessor.from_pretrained(clip_folder).save_pretrained(tmp_path / "saved")
    shutil.rmtree(model.config.vision_encoder)  # the original encoder folder is not needed any more
    for cls in (EveForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path / "saved")
        assert isinstance(loaded, EveForCausalLM) and loaded.config == model.config
        assert torch.equal(loaded(ids, images=images).logits, before)


def test_efficientnet_round_trip_logits(effnet_folder, tmp_path):
    model = EveForCausalLM.from_pretrained(effnet_folder)
    ids = torch.tensor([[5, -200, 7, 8]])
    images = _images((32, 64))
    model.save_pretrained(tmp_path)
    assert torch.equal(EveForCausalLM.from_pretrained(tmp_path)(ids, images=images).logits,
                       model(ids, images=images).logits)


def test_training_trains_the_projector_not_the_frozen_encoder(effnet_folder):
    torch.manual_seed(0)
    model = EveForCausalLM.from_pretrained(effnet_folder)
    model.train()
    groups = set_trainable(model, ["vision", "llm"])
    encoder = model.model.vision_tower.encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    assert "encoder" not in groups and groups["vision"]
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}  # BatchNorm statistics included
    params = [p for ps in groups.values() for p in ps]
    opt = torch.optim.AdamW(params, lr=3e-3)
    ids = torch.tensor([[5, -200, 7, 8, 9, 10], [5, -200, 11, 12, 13, 14]])
    labels = ids.clone()
    labels[:, :2] = -100
    images = _images((64, 64), (32, 96))
    losses = []
    for _ in range(8):
        loss = model(ids, images=images, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in frozen.items())
    assert not encoder.training and model.model.vision_tower.projector.training


def test_trainable_encoder_gets_gradients(clip_folder):
    config = EveConfig.from_pretrained(clip_folder)
    config.vision_encoder_trainable = True
    model = EveForCausalLM.from_pretrained(clip_folder, config=config)
    groups = set_trainable(model, ["vision", "encoder", "llm"])
    assert groups["encoder"]
    ids = torch.tensor([[5, -200, 7, 8]])
    model(ids, images=_images((64, 64)), labels=ids.clamp(min=0)).loss.backward()
    named = dict(model.named_parameters())
    assert named["model.vision_tower.encoder.model.embeddings.patch_embedding.weight"].grad is not None
    with_grad = [p for p in groups["encoder"] if p.grad is not None]
    assert len(with_grad) >= len(groups["encoder"]) - 2  # all but the unused post-layernorm (pooler only)


@pytest.mark.parametrize("which", ["effnet", "clip"])
def test_batched_generation_equals_single(which, effnet_folder, clip_folder):
    folder = effnet_folder if which == "effnet" else clip_folder
    model = EveForCausalLM.from_pretrained(folder)
    processor = EveProcessor.from_pretrained(folder)
    images = [make_png(48, 32, (200, 30, 30), 0), make_png(20, 70, (0, 0, 200), 1), make_png(40, 40, (20, 180, 20), 2)]
    questions = ["<image>\nWhat is this?", "Describe <image> please.", "<image>\nHow many shapes?", "Hi."]
    image_lists = [[images[0]], [images[1]], [images[2]], []]
    batched = answer(model, processor, questions, image_lists, max_new_tokens=10)
    singles = [answer(model, processor, [q], [i], max_new_tokens=10)[0] for q, i in zip(questions, image_lists, strict=True)]
    assert batched == singles
    # Hugging Face's generate gives the same greedy tokens
    inputs = processor(build_prompts(processor, questions[:3]), images=images, padding_side="left")
    eos, pad = model.config.eos_token_ids, processor.pad_token_id
    ours = generate(model, inputs["input_ids"], inputs["images"], inputs["attention_mask"],
                    config=GenerationConfig(max_new_tokens=8, eos_token_id=eos, pad_token_id=pad))
    hf = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    for row, seq in zip(hf[:, inputs["input_ids"].shape[1]:].tolist(), ours.sequences, strict=True):
        assert row[: len(seq)] == seq


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(vision="clip"), "unknown vision"),
        (dict(vision="encoder", modality_experts=True), "modality_experts"),
        (dict(vision="encoder", modality_experts=False, vision_encoder_stage="stride4"), "vision_encoder_stage"),
        (dict(vision="encoder", modality_experts=False, patch_stride=14), "patch_stride=14"),
        (dict(vision="encoder", modality_experts=False, vision_encoder="/no/such/folder"), "neither"),
    ],
)
def test_invalid_combinations_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        EveForCausalLM(tiny_model_config("v2", 100, **fields))


def test_v1_encoder_model_has_no_aligning_layer(tmp_path):
    clip = _clip_folder(tmp_path / "clip14", patch=14)
    model = EveForCausalLM(tiny_model_config("v1", 100, vision="encoder", vision_encoder=str(clip)))
    assert model.model.mm_projector is None
    assert model.model.encode_images(_images((56, 84))).grids == [(2, 3)]
    with pytest.raises(ValueError, match="encoder-based"):
        model.attach_aligning_layer(object())  # type: ignore[arg-type]


def test_patch_models_are_unchanged():
    """The default stays EVE's patch embedding, and an old config without the new fields loads."""
    config = tiny_model_config("v2", 100)
    assert config.vision == "patch"
    data = config.to_dict()
    for key in [k for k in data if k.startswith("vision_encoder")] + ["vision"]:
        data.pop(key)
    assert EveConfig.from_dict(data) == config


def test_llm_conversion_builds_the_baseline_with_the_pretrained_encoder(tmp_path):
    """`convert_llm_folder(..., vision="encoder")`: the LLM's decoder, ImageNet EfficientNet, scaled tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from eve_vlm.conversion import convert_llm_folder
    from eve_vlm.model.teacher_efficientnet import EfficientNetTeacher
    from eve_vlm.testing import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer("v2", folder=tmp_path / "llm")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llm")
    model, processor = convert_llm_folder(tmp_path / "llm", tmp_path / "eve", version="v2", vision="encoder")
    loaded = EveForCausalLM.from_pretrained(tmp_path / "eve")
    assert loaded.config.vision == "encoder" and not loaded.config.modality_experts
    teacher = EfficientNetTeacher.from_installed("stride16").net
    stem = loaded.model.vision_tower.encoder.stem.weight
    assert torch.equal(stem, teacher._conv_stem.weight)
    image = torch.randn(3, 64, 96)
    assert loaded.model.encode_images([image]).lengths == [processor.num_image_tokens(image)]
    tokens = loaded.model.encode_images([torch.randn(3, 128, 128)]).tokens.detach()
    ratio = float(tokens.pow(2).mean().sqrt() / loaded.model.embed_tokens.weight.detach().pow(2).mean().sqrt())
    assert 0.3 < ratio < 3.0


# ---------------------------------------------------------------------- recipes
def _recipe(out, *overrides):
    from eve_vlm.train import Recipe
    from eve_vlm.train.catalog import recipes_root

    return Recipe.load(recipes_root() / "tiny/eve_v2/3_sft.yaml",
                       [f"output_dir={out}", "model.vision=encoder", "trainable=[vision, llm]", *overrides])


@pytest.mark.slow
def test_a_recipe_trains_the_baseline_with_its_encoder_frozen(tmp_path):
    import json

    from eve_vlm.model.teacher_efficientnet import EfficientNetTeacher
    from eve_vlm.train import Trainer

    trainer = Trainer.from_recipe(_recipe(tmp_path, "max_steps=6", "global_batch_size=4", "data.generated_samples=24"),
                                  progress=False)
    model = trainer.model
    assert model.config.vision == "encoder" and not model.config.modality_experts
    encoder = model.model.vision_tower.encoder
    pretrained = EfficientNetTeacher.from_installed("stride16").net
    assert torch.equal(encoder.stem.weight, pretrained._conv_stem.weight)  # the real encoder, not random
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    projector = model.model.vision_tower.projector[0].weight.detach().clone()
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    final = EveForCausalLM.from_pretrained(tmp_path / "final")
    assert final.config.vision == "encoder"
    after = final.model.vision_tower.encoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(final.model.vision_tower.projector[0].weight, projector)


def test_recipe_vision_is_strict(tmp_path):
    from eve_vlm.train import Recipe, RecipeError
    from eve_vlm.train.catalog import recipes_root

    assert _recipe(tmp_path).model.vision == "encoder"
    with pytest.raises(RecipeError, match="model.vision must be one of"):
        _recipe(tmp_path, "model.vision=clip")
    with pytest.raises(RecipeError, match="teacher.kind must be none"):
        Recipe.load(recipes_root() / "tiny/eve_v1/1_prealign.yaml", ["model.vision=encoder"])
    with pytest.raises(RecipeError, match="model.vision must be one of"):
        _recipe(tmp_path, "model.vision=[encoder]")
    assert "encoder" not in Recipe().trainable  # a recipe trains a pretrained encoder only when it names it


def test_recipe_vision_must_match_the_checkpoint(tmp_path, effnet_folder):
    from eve_vlm.train import RecipeError
    from eve_vlm.train.builder import build_model_and_processor

    patch = make_tiny_checkpoint(tmp_path / "patch", "v2")
    with pytest.raises(RecipeError, match="holds a vision='patch' model"):
        build_model_and_processor(_recipe(tmp_path, f"model.init={patch}", "model.tiny=false"))
    model, _ = build_model_and_processor(_recipe(tmp_path, f"model.init={effnet_folder}", "model.tiny=false"))
    assert model.config.vision == "encoder"


# ---------------------------------------------------------------------- serving and evaluation
def test_serve_and_eval_run_the_baseline_unchanged(effnet_folder, tmp_path):
    """`eve serve` and `eve eval` load it through the same public interface as EVE models."""
    import base64
    import json
    from pathlib import Path

    from fastapi.testclient import TestClient

    from eve_vlm.cli import main
    from eve_vlm.loading import load_for_inference
    from eve_vlm.serve import ServerSettings, create_app

    model, processor = load_for_inference(effnet_folder, device="cpu")
    png = make_png(48, 32, (200, 30, 30), 0)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": "What is this?"}]}], "max_tokens": 6}
    with TestClient(create_app(model, processor, ServerSettings(model_name="encoder"))) as client:
        resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    expected = answer(model, processor, ["<image>\nWhat is this?"], [[png]], max_new_tokens=6)[0]
    assert resp.json()["choices"][0]["message"]["content"] == expected

    pope = Path(__file__).resolve().parents[1] / "eval" / "fixtures" / "benchmarks" / "pope"
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(effnet_folder), "--benchmark", "pope", "--data", str(pope), "--limit", "2",
            "--out", str(out), "--max-new-tokens", "3", "--device", "cpu"]
    assert main(argv) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "results.json").read_text())["num_missing"] == 0


def test_siglip_and_an_inner_layer(tmp_path):
    """SigLIP (no class token, mean = std = 0.5) and `vision_encoder_layer` picking an inner hidden state."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(5)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         image_size=64, patch_size=16)).save_pretrained(tmp_path / "siglip")
    model = EveForCausalLM(tiny_model_config("v2", 100, vision_encoder=str(tmp_path / "siglip"), vision_encoder_layer=-2,
                                             **ENCODER))
    load_pretrained_encoder(model)
    tower = model.model.vision_tower
    torch.testing.assert_close(tower.input_shift * 0.5 + 0.5, torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    images = _images((64, 64), (32, 128))
    assert model.model.encode_images(images).grids == [(2, 2), (1, 4)]
    pixels = images[1][None] * tower.input_scale.view(1, 3, 1, 1) + tower.input_shift.view(1, 3, 1, 1)
    hidden = tower.encoder.model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
    torch.testing.assert_close(tower.encoder(pixels), hidden.hidden_states[-2].reshape(1, 2, 8, 32))
