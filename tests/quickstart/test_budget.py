"""The quickstart's budget planner: shortens what is left of a run on a machine slower than the reference."""

from __future__ import annotations

import logging

import pytest

from eve_vlm.quickstart.budget import (
    MIN_STEP_FRACTION,
    REFERENCE_EVAL_SECONDS_PER_QUESTION,
    REFERENCE_STEP_SECONDS,
    BudgetPlanner,
)

RECIPE = {"1_prealign": 360, "2_pretrain": 180, "3_sft": 900, "blind": 100}


def reference_seconds(steps: dict[str, int]) -> float:
    return sum(n * REFERENCE_STEP_SECONDS[p] for p, n in steps.items())


def planner(budget_minutes: float = 15.0) -> BudgetPlanner:
    return BudgetPlanner(budget_seconds=budget_minutes * 60, steps=dict(RECIPE), eval_questions=1000, evaluations=2)


def finish_stage1(p: BudgetPlanner, slowdown: float, setup: float = 10.0) -> float:
    took = slowdown * RECIPE["1_prealign"] * REFERENCE_STEP_SECONDS["1_prealign"]
    p.record("1_prealign", RECIPE["1_prealign"], took)
    return setup + took


def predicted_end(p: BudgetPlanner, elapsed: float, slowdown: float) -> float:
    todo = {k: n for k, n in p.planned.items() if k not in p.measured}
    evals = 2 * 1000 * REFERENCE_EVAL_SECONDS_PER_QUESTION
    return elapsed + slowdown * (reference_seconds(todo) + evals)


def test_the_reference_machine_keeps_the_recipe_steps():
    p = planner()
    elapsed = finish_stage1(p, 1.0)
    assert p.speed_factor() == pytest.approx(1.0)
    assert p.replan(elapsed) == RECIPE
    assert not p.summary()["shortened"]


@pytest.mark.parametrize("slowdown", [1.4, 1.383, 1.429])  # 1.383, 1.429: the plan fits to the last ulp
def test_a_slow_machine_shortens_stage3_but_not_the_short_blind_model_to_fit(slowdown, caplog):
    p = planner()
    elapsed = finish_stage1(p, slowdown)
    with caplog.at_level(logging.WARNING, logger="eve_vlm.quickstart.budget"):
        plan = p.replan(elapsed)
    assert "exceed" not in caplog.text  # it fits: no false alarm from rounding
    assert p.speed_factor() == pytest.approx(slowdown)
    assert plan["2_pretrain"] == RECIPE["2_pretrain"]  # stage 3 gives way first
    assert plan["3_sft"] < RECIPE["3_sft"] and plan["blind"] == RECIPE["blind"]
    assert predicted_end(p, elapsed, slowdown) <= 15 * 60
    # at the full steps it would not have fitted
    evals = 2 * 1000 * REFERENCE_EVAL_SECONDS_PER_QUESTION
    assert elapsed + slowdown * (reference_seconds({k: RECIPE[k] for k in ("2_pretrain", "3_sft", "blind")}) + evals) > 15 * 60
    summary = p.summary()
    assert summary["shortened"] and summary["recipe_steps"] == RECIPE


def test_replanning_after_stage2_uses_its_measured_speed():
    p = planner()
    elapsed = finish_stage1(p, 1.0)
    assert p.replan(elapsed) == RECIPE
    took = 1.6 * RECIPE["2_pretrain"] * REFERENCE_STEP_SECONDS["2_pretrain"]  # stage 2 ran slow
    p.record("2_pretrain", RECIPE["2_pretrain"], took)
    plan = p.replan(elapsed + took)
    assert plan["3_sft"] < RECIPE["3_sft"] and plan["blind"] == RECIPE["blind"]
    assert predicted_end(p, elapsed + took, p.speed_factor()) <= 15 * 60


def test_a_far_too_slow_machine_keeps_the_floors_and_warns(caplog):
    p = planner()
    elapsed = finish_stage1(p, 3.0)
    with caplog.at_level(logging.WARNING, logger="eve_vlm.quickstart.budget"):
        plan = p.replan(elapsed)
    assert plan["3_sft"] == int(RECIPE["3_sft"] * MIN_STEP_FRACTION["3_sft"])
    assert plan["2_pretrain"] == int(RECIPE["2_pretrain"] * MIN_STEP_FRACTION["2_pretrain"])
    assert "exceed" in caplog.text


def test_after_stage3_the_blind_model_keeps_its_steps_and_only_a_warning_remains(caplog):
    p = planner()
    elapsed = finish_stage1(p, 1.0)
    p.replan(elapsed)
    for stage, slowdown in (("2_pretrain", 1.0), ("3_sft", 2.5)):  # stage 3 ran slow: the run will overrun
        took = slowdown * p.planned[stage] * REFERENCE_STEP_SECONDS[stage]
        p.record(stage, p.planned[stage], took)
        elapsed += took
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="eve_vlm.quickstart.budget"):
            plan = p.replan(elapsed)
    assert plan["blind"] == RECIPE["blind"]
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("budget: blind") for m in messages), messages  # never "shortened", even in the log
    assert any("exceed" in m for m in messages)


def test_phases_without_a_reference_time_are_rejected():
    with pytest.raises(ValueError, match="no reference step time"):
        BudgetPlanner(budget_seconds=60, steps={"4_rlhf": 10}, eval_questions=10, evaluations=1)


def test_a_running_stage3_is_replanned_from_its_own_speed():
    """Stages 1-2 ran 1.6x slow, so stage 3 was cut; if it then runs at reference speed, it gets
    its steps back (never past the recipe), and if it runs slower still, it loses more."""
    def after_stage2() -> tuple[BudgetPlanner, float]:
        p = planner()
        elapsed = finish_stage1(p, 1.6)
        took = 1.6 * RECIPE["2_pretrain"] * REFERENCE_STEP_SECONDS["2_pretrain"]
        p.record("2_pretrain", RECIPE["2_pretrain"], took)
        p.replan(elapsed + took)
        return p, elapsed + took

    p, elapsed = after_stage2()
    cut = p.planned["3_sft"]
    assert cut < RECIPE["3_sft"]
    done = 60
    fast = p.replan_running("3_sft", done, done * REFERENCE_STEP_SECONDS["3_sft"], elapsed + done * REFERENCE_STEP_SECONDS["3_sft"])
    assert cut < fast <= RECIPE["3_sft"] and p.planned["3_sft"] == fast
    # it fits: the rest of stage 3 at its own speed, then the blind model and two evaluations
    ref = reference_seconds({"1_prealign": RECIPE["1_prealign"], "2_pretrain": RECIPE["2_pretrain"], "3_sft": done})
    f = (sum(s for _, s in p.measured.values()) + done * REFERENCE_STEP_SECONDS["3_sft"]) / ref
    rest = (fast - done) * REFERENCE_STEP_SECONDS["3_sft"] + f * (RECIPE["blind"] * REFERENCE_STEP_SECONDS["blind"] + 2 * 1000 * REFERENCE_EVAL_SECONDS_PER_QUESTION)
    assert elapsed + done * REFERENCE_STEP_SECONDS["3_sft"] + rest <= 15 * 60

    p, elapsed = after_stage2()
    slow_step = 2.2 * REFERENCE_STEP_SECONDS["3_sft"]
    slow = p.replan_running("3_sft", done, done * slow_step, elapsed + done * slow_step)
    assert int(RECIPE["3_sft"] * MIN_STEP_FRACTION["3_sft"]) <= slow < cut
