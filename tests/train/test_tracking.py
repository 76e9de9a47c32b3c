"""Experiment tracking: `report_to: [tensorboard]` writes the step scalars a run is watched by into
TensorBoard event files (read back with TensorBoard's own reader); the field is strictly parsed,
and selecting a tracker that is not installed fails before training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eve_vlm.train import Recipe, RecipeError, Trainer
from eve_vlm.train.catalog import recipes_root
from eve_vlm.train.tracking import TensorBoardTracker, check_trackers, eval_scalars

torch.set_num_threads(1)
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

V1 = recipes_root() / "tiny" / "eve_v1" / "1_prealign.yaml"  # aligning layer + teacher: an aligning loss


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_loss_aligning_loss_lr_per_group_grad_norm_tokens_s_and_padding_waste(tmp_path: Path) -> None:
    recipe = Recipe.load(V1, [f"output_dir={tmp_path}", "max_steps=3", "report_to=[tensorboard]",
                              "optim.group_lr={vision: 0.001}"])
    trainer = Trainer.from_recipe(recipe, progress=False)
    trainer.train()
    trainer.report_evaluation({"accuracy": 0.5, "per_task": {"shapes": 0.25}, "model": "x"})
    groups = [g["name"] for g in trainer.parts.optimizer.param_groups]
    assert len(groups) >= 2

    scalars = read_scalars(tmp_path / "tensorboard")
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    expected = {"train/loss": "loss", "train/lm_loss": "lm_loss", "train/aligning_loss": "aligning_loss",
                "train/grad_norm": "grad_norm", "train/tokens_per_s": "tokens_per_s",
                "train/padding_waste": "padding_waste"}
    for tag, key in expected.items():
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([m[key] for m in steps], rel=1e-6), tag
    assert scalars["train/aligning_loss"][0][1] > 0
    assert 0 <= scalars["train/padding_waste"][0][1] < 1
    for name in groups:  # the learning rate of every parameter group, each on its own schedule
        assert [v for _, v in scalars[f"lr/{name}"]] == pytest.approx([m["lr_groups"][name] for m in steps])
    assert scalars["lr/vision"][-1][1] != pytest.approx(scalars[f"lr/{groups[-1]}"][-1][1])
    # the evaluation was reported after training: the writer was closed, so it is not in the files
    assert not any(tag.startswith("eval/") for tag in scalars)


def test_a_resume_purges_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    run = [f"output_dir={tmp_path}", "max_steps=4", "save_every=2", "report_to=[tensorboard]"]
    Trainer.from_recipe(Recipe.load(V1, run), progress=False).train(stop_after=3)
    Trainer.from_recipe(Recipe.load(V1, run), progress=False).train(resume=True)
    loss = read_scalars(tmp_path / "tensorboard")["train/loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4]  # step 3 of the interrupted run is gone


def test_eval_metrics_become_eval_tags() -> None:
    assert eval_scalars({"accuracy": 0.5, "per_task": {"a": 1}, "ok": True, "name": "x"}) == {
        "eval/accuracy": 0.5, "eval/per_task/a": 1.0}


def test_only_the_main_process_writes(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path / "tb")
    tracker.on_train_start(SimpleNamespace(dist=SimpleNamespace(main=False), state=SimpleNamespace(step=0)))
    tracker.on_step_end(None, {"step": 1, "loss": 1.0})  # type: ignore[arg-type]
    tracker.close()
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [("tensorboard", "must be a list"), ("[tensorboard, mlflow]", "unknown or repeated trackers ['mlflow']"),
     ("[tensorboard, tensorboard]", "unknown or repeated"), ("[1]", "must be a list of tracker names")],
)
def test_report_to_is_strictly_parsed(value: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Recipe.load(V1, [f"report_to={value}"])
    assert Recipe.load(V1).report_to == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_selecting_wandb_without_it_installed_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="report_to selects 'wandb', but wandb is not installed"):
        check_trackers(["wandb"])
    with pytest.raises(RecipeError, match="wandb is not installed"):
        Trainer.from_recipe(Recipe.load(V1, [f"output_dir={tmp_path}", "report_to=[wandb]"]), progress=False)
