"""`eve quickstart --stage3-lora`: stage 3 becomes a LoRA fine-tune; the other stages stay as they are."""

from __future__ import annotations

import pytest

from eve_vlm.cli import build_parser, main
from eve_vlm.quickstart.run import STAGE3_LORA, STAGES, QuickstartConfig, stage_recipe


def test_stage3_lora_turns_only_stage_3_into_a_lora_fine_tune():
    lora = QuickstartConfig(steps_scale=1.0, stage3_lora=True)
    full = QuickstartConfig(steps_scale=1.0)
    for stage in STAGES:
        assert stage_recipe(stage, full, []).lora is None
        assert (stage_recipe(stage, lora, []).lora is not None) == (stage == "3_sft")
    a, b = stage_recipe("3_sft", lora, []), stage_recipe("3_sft", full, [])
    assert a.lora.r == 64 and a.optim.lr > b.optim.lr and a.optim.group_lr == {}
    assert (a.max_steps, a.freeze, a.data) == (b.max_steps, b.freeze, b.data)  # the same stage, data and steps
    assert "lora.r=64" in STAGE3_LORA
    # the user's overrides come after the flag's settings
    tuned = QuickstartConfig(steps_scale=1.0, stage3_lora=True, overrides=("3_sft:lora.r=8", "3_sft:optim.lr=2e-3"))
    assert (stage_recipe("3_sft", tuned, []).lora.r, stage_recipe("3_sft", tuned, []).optim.lr) == (8, 2e-3)


def test_the_flag_reaches_the_config_and_bad_lora_overrides_fail_at_once(tmp_path, capsys):
    from eve_vlm.quickstart.cli import _config

    args = build_parser().parse_args(["quickstart", "--stage3-lora", "--out", str(tmp_path / "qs")])
    assert _config(args).stage3_lora
    assert not _config(build_parser().parse_args(["quickstart"])).stage3_lora
    assert main(["quickstart", "--stage3-lora", "--out", str(tmp_path / "qs"), "--set", "3_sft:lora.r=0"]) == 2
    assert "lora.r must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


def test_help_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    assert "--stage3-lora" in capsys.readouterr().out
