"""A reduced `eve compare` grid end to end on tiny random models and generated shapes (seconds)."""

from __future__ import annotations

import json

import pytest

from eve_vlm.compare.config import QUESTION_TYPES, CompareConfig, Grid

from .conftest import shapes_study

RUN_KEYS = {"model", "budget", "data_fraction", "train_flops", "train_seconds", "accuracy", "per_type",
            "inference_flops_per_answer", "curve"}
TIMINGS = {"train_seconds", "wall_seconds"}


def tiny_config(out, models, seed=0, wall_seconds=1e-6, fractions=(0.5, 1.0)):
    # 2-6 alignment steps and 6-10 fine-tuning steps of the tiny models; the wall budget ends at
    # the first check (after alignment), so that both budgets' results are reproducible here.
    grid = Grid(data_fractions=fractions, wall_seconds=wall_seconds, flops=1.0e9, curve_points=2, eval_questions=36)
    return CompareConfig(out=out, seed=seed, models=models, grid=grid, batch_size=4, sft_batch_size=1,
                         sft_warmup_steps=2, v1_teacher={"kind": "random_clip", "image_size": 56},
                         questions_per_sample=2, eval_batch_size=16)


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


pytestmark = pytest.mark.slow  # ~1 min each on two loaded cores


@pytest.fixture
def study(tmp_path):
    return shapes_study(tmp_path / "shapes")


def test_a_tiny_grid_writes_the_schema_and_keeps_the_flops_budget(tmp_path, study, tiny_factory):
    from eve_vlm.compare.study import run_study

    cfg = tiny_config(tmp_path / "out", ("eve_v1", "eve_v2", "encoder"))
    summary = run_study(cfg, data=study, factory=tiny_factory, command="eve compare --out X")
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    runs = saved["runs"]
    assert {(r["model"], r["budget"], r["data_fraction"]) for r in runs} == {
        (m, b, f) for m in ("eve_v1", "eve_v2", "encoder") for b in ("flops", "wall") for f in (0.5, 1.0)}
    for r in runs:
        assert RUN_KEYS <= set(r), r.keys()
        assert set(r["per_type"]) == set(QUESTION_TYPES)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["inference_flops_per_answer"] > 0
        assert r["curve"] and all({"train_flops", "train_seconds", "accuracy"} <= set(p) for p in r["curve"])
        flops = [p["train_flops"] for p in r["curve"]]
        assert flops == sorted(flops) and len(set(flops)) == len(flops), flops  # monotone in FLOPs
        assert [p["train_seconds"] for p in r["curve"]] == sorted(p["train_seconds"] for p in r["curve"])
        assert r["curve"][-1]["train_flops"] == r["train_flops"] and r["curve"][-1]["accuracy"] == r["accuracy"]
    for fraction in (0.5, 1.0):
        spent = [r["train_flops"] for r in runs if r["budget"] == "flops" and r["data_fraction"] == fraction]
        assert max(spent) <= 1.1 * min(spent), spent  # the compared runs are within 10% of each other
        assert min(spent) >= saved["grid"]["flops_budget"]
    flops_runs = [r for r in runs if r["budget"] == "flops"]
    assert all(len(r["curve"]) >= 2 for r in flops_runs)  # the curve points, the budget's end among them
    encoder = next(r for r in runs if r["model"] == "encoder")
    assert encoder["cost"]["sft_row_parts"]["frozen_vision"] > 0  # the frozen encoder's forward is counted
    assert all(r["cost"]["sft_row_parts"]["frozen_vision"] == 0 for r in runs if r["model"] != "encoder")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "eve compare --out X" in report and "| 0.5 (12 images) | flops |" in report
    assert (tmp_path / "out" / "accuracy_vs_flops.png").is_file()


def test_the_same_seed_gives_the_same_results(tmp_path, study, tiny_factory):
    from eve_vlm.compare.study import run_study

    first = run_study(tiny_config(tmp_path / "a", ("eve_v2",), fractions=(0.5,)), data=study, factory=tiny_factory)
    second = run_study(tiny_config(tmp_path / "b", ("eve_v2",), fractions=(0.5,)), data=study, factory=tiny_factory)
    assert without_timings(first["runs"]) == without_timings(second["runs"])
