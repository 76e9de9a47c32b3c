"""The study's parts without training: settings, data, recipes, FLOPs counting, budget bookkeeping."""

from __future__ import annotations

import json

import pytest

from eve_vlm.compare.config import (
    DEFAULT_GRID,
    FULL_GRID,
    REFERENCE_TRAIN_FLOPS_PER_SECOND,
    CompareConfig,
    Grid,
)
from eve_vlm.compare.run import Progress, check_points

from .conftest import shapes_study


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="models"):
        CompareConfig(models=("eve_v3",))
    with pytest.raises(ValueError, match="data fractions"):
        Grid((0.0,), 10, 1e9)
    with pytest.raises(ValueError, match="align_fraction"):
        CompareConfig(align_fraction=1.0)


def test_the_grids_budgets_follow_the_reference_speed():
    assert DEFAULT_GRID.data_fractions == (0.25,) and FULL_GRID.data_fractions == (0.25, 0.5, 1.0)
    for grid in (DEFAULT_GRID, FULL_GRID):
        assert grid.flops == pytest.approx(grid.wall_seconds * REFERENCE_TRAIN_FLOPS_PER_SECOND)
    assert CompareConfig(full=True).the_grid is FULL_GRID and CompareConfig().the_grid is DEFAULT_GRID


def test_smaller_fractions_are_prefixes_and_records_keep_every_question(tmp_path):
    from eve_vlm.compare.data import write_records

    study = shapes_study(tmp_path / "shapes", n_train=8, n_test=2)
    half, full = study.fraction(0.5), study.fraction(1.0)
    assert len(half) == 4 and full[:4] == half
    paths = write_records(full, tmp_path / "rec", questions_per_sample=2, seed=0)
    captions = [json.loads(line) for line in paths["captions"].read_text().splitlines()]
    qa = [json.loads(line) for line in paths["qa"].read_text().splitlines()]
    assert len(captions) == 8
    assert len(qa) == 16  # three questions an image, at most two a row: rows of 2 and 1
    asked = sorted(t["value"].removeprefix("<image>\n") for r in qa for t in r["conversations"] if t["from"] == "human")
    assert asked == sorted(q.text for im in full for q in im.questions)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in qa)


@pytest.mark.parametrize("kind", ["eve_v1", "eve_v2", "encoder"])
def test_stage_recipes_train_what_each_model_has(kind, tmp_path):
    from eve_vlm.compare.models import stage_recipe

    cfg = CompareConfig()
    version = "v2" if kind == "eve_v2" else "v1"
    align = stage_recipe(kind, "align", version=version, data=tmp_path / "c.jsonl", out=tmp_path, steps=10, seed=3, cfg=cfg)
    sft = stage_recipe(kind, "sft", version=version, data=tmp_path / "q.jsonl", out=tmp_path, steps=100, seed=3, cfg=cfg)
    assert "llm" not in align.trainable and "llm" in sft.trainable and "encoder" not in sft.trainable
    assert align.teacher.kind == ("efficientnet" if kind == "eve_v1" else "none")
    assert ("experts" in align.trainable) == (kind == "eve_v2")
    assert sft.optim.schedule == "constant" and round(sft.optim.warmup_ratio * 100) == cfg.sft_warmup_steps
    assert sft.data.independent_turns and sft.seed == align.seed == 3
    assert (align.model.vision == "encoder") == (kind == "encoder")


def test_budget_bookkeeping_stops_each_budget_once_and_keeps_the_curve_monotone():
    calls = []

    def evaluate():
        calls.append(1)
        return {"accuracy": len(calls) / 10, "per_type": {}}

    p = Progress(Grid((1.0,), wall_seconds=5.0, flops=100.0, curve_points=4))
    for _ in range(12):  # steps of 9 FLOPs and 1 s
        p.flops += 9
        p.seconds += 1.0
        p.steps += 1
        check_points(p, evaluate)
    assert p.at_budget["wall"]["steps"] == 5 and p.at_budget["wall"]["wall_budget_reached"]
    assert p.at_budget["flops"]["steps"] == 12 and p.at_budget["flops"]["train_flops"] == 108
    assert [c["steps"] for c in p.curve] == [3, 5, 6, 9, 12]  # 25, 50, 75, 100 FLOPs and the wall's end
    assert len(calls) == len(p.curve)


def test_a_frozen_encoder_counts_forward_only(tiny_factory):
    from PIL import Image

    from eve_vlm.compare.flops import RowShape, step_flops, vision_forward_flops

    model, processor = tiny_factory("encoder")
    pixels = processor(images=[Image.new("RGB", (64, 64), (255, 0, 0))])["images"][0]
    total, frozen = vision_forward_flops(model, pixels)
    assert 0 < frozen < total
    tokens = processor.num_image_tokens(pixels)
    trains = step_flops(model, pixels, tokens, RowShape(10, 2), 4, vision_trains=True, llm_trains=True)
    assert trains.per_row["frozen_vision"] == frozen and trains.per_row["vision"] == 3 * (total - frozen)
    assert trains.step == pytest.approx(4 * sum(trains.per_row.values()))
    frozen_llm = step_flops(model, pixels, tokens, RowShape(10, 2), 4, vision_trains=True, llm_trains=False)
    assert frozen_llm.per_row["decoder"] == pytest.approx(trains.per_row["decoder"] * 2 / 3)


def test_without_matplotlib_the_report_is_written_without_plots(tmp_path, monkeypatch):
    import builtins

    from eve_vlm.compare.report import plot_curves, write_report

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    point = {"train_flops": 1e9, "train_seconds": 2.0, "accuracy": 0.5, "per_type": {"color": 0.5}, "steps": 3}
    cost = {"visual_tokens": 21, "align_steps": 1, "align_step": 1e8, "sft_step": 2e8, "align_row_parts": {"decoder": 1.0},
            "sft_row_parts": {"decoder": 2.0}}
    run = {"model": "eve_v2", "budget": "flops", "data_fraction": 0.25, "train_images": 10, "inference_flops_per_answer": 5e8,
           **{k: point[k] for k in ("train_flops", "train_seconds", "accuracy", "per_type", "steps")}, "curve": [point], "cost": cost}
    summary = {"command": "eve compare --out X", "seed": 0, "wall_seconds": 60.0, "runs": [run], "models": {},
               "machine": {"platform": "test", "threads": 2, "torch": "x"},
               "grid": {"flops_budget": 1e9, "wall_budget_seconds": 2.0, "eval_questions": 4, "data_fractions": [0.25],
                        "train_images": 40}}
    assert plot_curves([run], tmp_path) == []
    write_report(summary, tmp_path, [])
    report = (tmp_path / "report.md").read_text()
    assert "no plots: matplotlib is not installed" in report and "**50.0%**" in report
    assert not list(tmp_path.glob("*.png"))
