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


@pytest.mark.slow
def test_a_few_steps_of_the_quickstart_with_stage3_lora_end_to_end(tmp_path):
    """The plumbing, not the accuracy: stage 3's final/ is the adapter, OUT/final the merged model
    that the evaluations, the report and `eve chat` use."""
    pytest.importorskip("easy_vqa")
    pytest.importorskip("efficientnet_lite_pytorch")
    from safetensors.torch import load_file

    from eve_vlm import EveForCausalLM
    from eve_vlm.quickstart.run import run_quickstart

    out = tmp_path / "qs"
    cfg = QuickstartConfig(out=out, steps_scale=0.005, eval_questions=8, blind=True, fit_budget=False,
                           multiturn_conversations=1, stage3_lora=True)
    metrics = run_quickstart(cfg)
    assert metrics["stage3"].startswith("lora ") and metrics["steps"]["3_sft"] == 6
    adapter = load_file(str(out / "3_sft/final/adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert not any(".layers.0." in k or ".layers.1." in k for k in adapter)  # frozen layers get none
    merged = EveForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in k for k in merged.state_dict())
    assert "- stage 3: lora " in (out / "report.md").read_text()
