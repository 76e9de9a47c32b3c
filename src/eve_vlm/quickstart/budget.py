"""Keep `eve quickstart` inside its wall-clock budget on a machine slower than the reference.

The recipe steps fill the budget on the reference 2-core CPU, but the same machine class runs
10-45% slower on some days. After every stage the planner compares the measured seconds per step
with the reference, predicts the rest of the run and, when it would overrun, shortens what is left:
stage 3 first, then stage 2. The blind model's few steps are never shortened.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..train import Trainer, TrainerCallback

logger = logging.getLogger(__name__)

# Seconds per step of the default recipes on the reference 2-core CPU (fp32), and per evaluated
# question; "blind" is the blind model's stage 3 (blank images). Measured on full default runs: a
# stage-3 or blind step costs 0.6-0.65x a stage-1 step, since its first layers are frozen and its
# last layer runs on target positions only; greedy evaluation takes ~11 ms a question.
REFERENCE_STEP_SECONDS: dict[str, float] = {"1_prealign": 0.60, "2_pretrain": 0.80, "3_sft": 0.39, "blind": 0.37}
REFERENCE_EVAL_SECONDS_PER_QUESTION = 0.011
# The least of a stage's planned steps the planner keeps: below this a stage teaches too little to
# be worth its seconds, and the run goes over its budget instead (with a warning).
MIN_STEP_FRACTION: dict[str, float] = {"3_sft": 0.3, "2_pretrain": 0.5}


@dataclass
class BudgetPlanner:
    """Plans the steps of the stages still to run so the whole run ends within `budget_seconds`."""

    budget_seconds: float
    steps: dict[str, int]  # planned steps per phase: the stages, and "blind" when the blind model runs
    eval_questions: int
    evaluations: int  # greedy evaluations still to run (the model and the blind model)
    extra_eval_questions: int = 0  # answers generated once more (the multi-turn evaluation's turns)
    margin: float = 0.97  # aim this fraction of the budget: report, plots and copies take seconds too
    measured: dict[str, tuple[int, float]] = field(default_factory=dict)
    planned: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        unknown = set(self.steps) - set(REFERENCE_STEP_SECONDS)
        if unknown:
            raise ValueError(f"no reference step time for {sorted(unknown)}")
        self.planned = dict(self.steps)

    def record(self, phase: str, steps: int, seconds: float) -> None:
        """A phase finished: `steps` steps in `seconds`."""
        self.measured[phase] = (steps, seconds)

    def speed_factor(self, running: tuple[str, int, float] | None = None) -> float:
        """Measured over reference seconds of the training run so far (1.0 before any); `running` adds
        a phase still in progress as (phase, steps done, seconds)."""
        done = [*self.measured.items(), *([(running[0], running[1:])] if running else [])]
        ref = sum(n * REFERENCE_STEP_SECONDS[p] for p, (n, _) in done)
        took = sum(s for _, (_, s) in done)
        return took / ref if ref > 0 else 1.0

    def _seconds_for_training(self, elapsed_seconds: float, f: float) -> float:
        """What the budget leaves for training steps once the evaluations are priced at speed `f`."""
        questions = self.evaluations * self.eval_questions + self.extra_eval_questions
        evals = f * questions * REFERENCE_EVAL_SECONDS_PER_QUESTION
        return self.budget_seconds * self.margin - elapsed_seconds - evals

    def replan(self, elapsed_seconds: float) -> dict[str, int]:
        """The steps for every phase, shortened where the rest would not fit in the budget."""
        f = self.speed_factor()
        todo = [p for p in self.planned if p not in self.measured]
        available = self._seconds_for_training(elapsed_seconds, f)
        # at the full recipe steps
        cost = {p: f * self.steps[p] * REFERENCE_STEP_SECONDS[p] for p in todo}
        c3 = cost.get("3_sft", 0.0)
        c2 = cost.get("2_pretrain", 0.0)
        other = sum(c for p, c in cost.items() if p not in ("3_sft", "2_pretrain"))
        scale3 = scale2 = 1.0
        if other + c2 + c3 > available:
            room = available - other
            if c3 > 0:
                scale3 = max(MIN_STEP_FRACTION["3_sft"], min(1.0, (room - c2) / c3))
            if c2 > 0 and c2 + c3 * scale3 > room + 1e-6:  # stage 3 at its floor (not a rounding error)
                scale2 = max(MIN_STEP_FRACTION["2_pretrain"], min(1.0, (room - c3 * scale3) / c2))
            if other + c2 * scale2 + c3 * scale3 > available + 1e-6:  # not a rounding error
                logger.warning(
                    "the machine runs %.2fx slower than the reference: the run will exceed its %.1f-minute budget "
                    "even at the shortest stages", f, self.budget_seconds / 60,
                )
        for p in todo:
            scale = scale3 if p == "3_sft" else scale2 if p == "2_pretrain" else 1.0
            new = max(2, int(self.steps[p] * scale))
            if new != self.planned[p]:
                logger.info("budget: %s %d -> %d steps (machine at %.2fx the reference step time)", p, self.planned[p], new, f)
            self.planned[p] = new
        return dict(self.planned)

    def replan_running(self, phase: str, done: int, seconds: float, elapsed_seconds: float) -> int:
        """The steps for `phase` while it runs (`done` steps in `seconds` so far), from its own speed.

        Why: stages 1-2 predict stage 3 only roughly (the machine's speed drifts within minutes), and
        a stage under a wsd schedule can still change its length until its decay begins. The other
        phases still to run are priced at the speed factor including this phase's steps so far.
        """
        per_step = seconds / max(done, 1)
        f = self.speed_factor(running=(phase, done, seconds))
        available = self._seconds_for_training(elapsed_seconds, f)
        available -= sum(f * self.planned[p] * REFERENCE_STEP_SECONDS[p] for p in self.planned if p not in self.measured and p != phase)
        floor = int(self.steps[phase] * MIN_STEP_FRACTION.get(phase, 1.0))
        new = max(floor, done + 1, min(self.steps[phase], done + int(available / per_step)))
        if new != self.planned[phase]:  # small corrections (a few steps each re-plan) only at debug level
            level = logging.INFO if abs(new - self.planned[phase]) >= max(5, 0.02 * self.planned[phase]) else logging.DEBUG
            logger.log(level, "budget: %s %d -> %d steps (it runs at %.2f s a step)", phase, self.planned[phase], new, per_step)
            self.planned[phase] = new
        return new

    def summary(self) -> dict[str, object]:
        return {
            "budget_seconds": self.budget_seconds,
            "speed_factor": round(self.speed_factor(), 3),
            "recipe_steps": dict(self.steps),
            "planned_steps": dict(self.planned),
            "shortened": any(self.planned[p] < self.steps[p] for p in self.steps),
        }


class RunningReplan(TrainerCallback):
    """Re-plans a running stage's length from its own speed every `every` steps, while its
    learning rate is still flat (the schedule says when: wsd before its decay, or constant)."""

    def __init__(self, planner: BudgetPlanner, stage: str, *, stage_start: float, run_start: float, every: int = 20):
        self.planner = planner
        self.stage = stage
        self.stage_start = stage_start
        self.run_start = run_start
        self.every = every

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        step, schedule = trainer.state.step, trainer.schedule
        if step % self.every or not schedule.can_resize(step):
            return
        now = time.perf_counter()
        planned = self.planner.replan_running(self.stage, step, now - self.stage_start, now - self.run_start)
        total = max(planned, schedule.shortest_total(step))  # too late to end sooner: the soonest possible
        if total != schedule.total:
            schedule.resize(total, step)
            self.planner.planned[self.stage] = total
