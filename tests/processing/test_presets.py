"""One table of the released models' geometry, read by every place that needs it."""

from __future__ import annotations

import pytest

from eve_vlm.conversion import config_from_llm, default_image_config
from eve_vlm.eval.profile import builtin_targets, load_target
from eve_vlm.model import EveConfig
from eve_vlm.processing.presets import (
    DEFAULT_PRESET,
    RELEASED_GEOMETRY,
    preset_for,
    preset_names,
    released_geometry,
)


def test_the_table_holds_the_released_settings():
    assert {name: (g.version, g.resolution, g.patch_stride * g.merge_stride) for name, g in RELEASED_GEOMETRY.items()} == {
        "eve-patch14-anypixel-672": ("v1", 672, 28),
        "eve-patch14-anypixel-1344": ("v1", 1344, 28),
        "eve-anyratio-res800-patch16": ("v2", 800, 32),
        "eve-anyratio-res1600-patch16": ("v2", 1600, 32),
    }
    assert preset_names() == sorted(RELEASED_GEOMETRY)
    with pytest.raises(KeyError, match="eve-anyratio-res800-patch16"):
        released_geometry("v3")


@pytest.mark.parametrize("name", sorted(RELEASED_GEOMETRY))
def test_processor_presets_come_from_the_table(name):
    geometry = RELEASED_GEOMETRY[name]
    cfg = preset_for(f"openai/{name}")
    assert cfg == geometry.image_config()
    assert cfg.token_stride == geometry.patch_stride * geometry.merge_stride
    side = cfg.image_size if cfg.version == "v1" else cfg.max_size
    assert side == geometry.resolution


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_conversion_defaults_come_from_the_table(tmp_path, version):
    geometry = RELEASED_GEOMETRY[DEFAULT_PRESET[version]]
    assert default_image_config(version) == geometry.image_config()
    assert default_image_config(version, 2016) == geometry.image_config(2016)
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, '
        '"num_hidden_layers": 1, "num_attention_heads": 2}'
    )
    config = config_from_llm(tmp_path, version)
    assert {k: getattr(config, k) for k in geometry.model_fields()} == geometry.model_fields()
    assert config.modality_experts == (version == "v2")


def test_profiler_targets_come_from_the_table(tmp_path):
    expected = {
        "eve-7b-v1": "eve-patch14-anypixel-672",
        "eve-7b-hd-v1": "eve-patch14-anypixel-1344",
        "eve-7b-hd-v2": "eve-anyratio-res1600-patch16",
    }
    targets = builtin_targets()
    for target, preset in expected.items():
        geometry = RELEASED_GEOMETRY[preset]
        assert targets[target].image_config == geometry.image_config()
        assert {k: getattr(targets[target].config, k) for k in geometry.model_fields()} == geometry.model_fields()
    # a checkpoint without any image config falls back to its version's default preset
    EveConfig(version="v1", family="llama").save(tmp_path)
    assert load_target(str(tmp_path)).image_config == released_geometry("v1").image_config()
