"""A reduced quickstart end to end (real SmolLM2, real EfficientNet teacher, real easy-VQA)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("efficientnet_lite_pytorch")


@pytest.mark.slow
def test_reduced_quickstart(tmp_path):
    from eve_vlm import EveForCausalLM, EveProcessor
    from eve_vlm.quickstart.run import QuickstartConfig, run_quickstart

    out = tmp_path / "qs"
    cfg = QuickstartConfig(out=out, steps_scale=0.1, eval_questions=64, blind=True)
    metrics = run_quickstart(cfg)

    for name in ("report.md", "loss.png", "metrics.json", "final/config.json", "final/model.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "blind_accuracy", "prior_accuracy", "wall_seconds"):
        assert key in saved
    for key in ("accuracy", "blind_accuracy", "prior_accuracy"):
        assert 0.0 <= saved[key] <= 1.0
    assert set(saved["per_type"]) == {"color", "shape", "yes_no"}
    assert set(saved["blind_per_type"]) == {"color", "shape", "yes_no"}
    assert metrics["eval_questions"] == 64
    # Every stage lowered its loss.
    for stage in ("1_prealign", "2_pretrain", "3_sft"):
        losses = [json.loads(line)["loss"] for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert min(losses[-2:]) < losses[0], (stage, losses)
    report = (out / "report.md").read_text()
    assert "| EVE (ours) |" in report and "answer prior" in report and "eve chat --model" in report
    # The final folder is what `eve chat` / `eve ask` load.
    EveForCausalLM.from_pretrained(out / "final")
    EveProcessor.from_pretrained(out / "final")
