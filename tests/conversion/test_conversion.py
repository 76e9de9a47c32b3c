"""The one conversion path: an LLM folder -> an EVE model + processor folder."""

from __future__ import annotations

import json

import pytest
import torch

from eve_vlm import EveForCausalLM, EveProcessor
from eve_vlm.conversion import convert_llm_folder, format_layers, parse_layers
from eve_vlm.processing.presets import released_geometry
from eve_vlm.testing import make_tiny_tokenizer


def tiny_llm(folder, version: str):
    """A random Hugging Face LLM of the version's family, with a tokenizer, saved in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tiny_tokenizer(version, folder=folder)
    torch.manual_seed(0)
    kw = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2)
    hf = LlamaForCausalLM(LlamaConfig(**kw)) if version == "v1" else Qwen2ForCausalLM(Qwen2Config(**kw))
    hf.save_pretrained(folder)
    return hf.eval(), tokenizer


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_converted_folder_loads_with_the_released_geometry_and_keeps_the_llm(tmp_path, version):
    hf, tokenizer = tiny_llm(tmp_path / "llm", version)
    geometry = released_geometry(version)
    model, processor = convert_llm_folder(tmp_path / "llm", tmp_path / "eve", version=version, vision_hidden_size=16)

    loaded = EveForCausalLM.from_pretrained(tmp_path / "eve")
    loaded_processor = EveProcessor.from_pretrained(tmp_path / "eve")
    assert loaded_processor.image_processor.config == geometry.image_config()
    assert (loaded.config.patch_stride, loaded.config.merge_stride) == (geometry.patch_stride, geometry.merge_stride)
    assert loaded.config.vision_hidden_size == 16
    assert loaded.config.eos_token_id == tokenizer.eos_token_id
    assert json.loads((tmp_path / "eve" / "config.json").read_text())["version"] == version

    ids = torch.tensor([tokenizer.encode("a red circle")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
        # fresh visual tokens are rescaled to the RMS of the LLM's word embeddings
        side = 2 * geometry.patch_stride * geometry.merge_stride
        tokens = loaded.model.encode_images([torch.randn(3, side, side)]).tokens
        word_rms = loaded.model.embed_tokens.weight.pow(2).mean().sqrt()
        assert 0.5 < float(tokens.pow(2).mean().sqrt() / word_rms) < 2.0


def test_resolution_and_layers_reach_the_model_and_processor(tmp_path):
    tiny_llm(tmp_path / "llm", "v1")
    model, processor = convert_llm_folder(
        tmp_path / "llm", None, version="v1", vision_hidden_size=16, resolution=1344, keep_layers=[0, 2]
    )
    assert processor.image_processor.config == released_geometry("eve-patch14-anypixel-1344").image_config()
    assert model.config.num_hidden_layers == 2


def test_a_missing_llm_folder_fails_first_with_its_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_llm_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_llm_folder(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layer_lists_round_trip():
    assert parse_layers("0-1,28-29") == (0, 1, 28, 29)
    assert format_layers(parse_layers("0-2,5,7-8")) == "0-2,5,7-8"
    with pytest.raises(ValueError, match="must look like"):
        parse_layers("0-x")
