"""Learning-rate schedules as resizable multipliers for `torch.optim.lr_scheduler.LambdaLR`.

A schedule is a callable object, not a closure: LambdaLR saves a callable object's attributes in
its state dict, so a resumed run continues with the same length, also after a resize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("cosine", "constant", "wsd")


@dataclass
class LrSchedule:
    """Linear warm-up, then `kind`:

    - cosine: decay to 0 over every step after warm-up;
    - constant: no decay;
    - wsd (warm-up, stable, decay): constant, then a linear decay to 0 over the last `decay_ratio`
      of the steps, which keeps the learning rate high for longer.
    """

    warmup: int
    total: int
    kind: str = "cosine"
    decay_ratio: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; known: {list(LR_SCHEDULES)}")

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            return min(1.0, (self.total - step) / self._decay_steps(self.total))
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def _decay_steps(self, total: int) -> int:
        return max(1, round(self.decay_ratio * total))

    def decay_start(self, total: int | None = None) -> int:
        """The step at which a wsd decay over `total` steps (default: the current length) begins."""
        total = self.total if total is None else total
        return total - self._decay_steps(total)

    def can_resize(self, step: int) -> bool:
        """Whether the length may still change at `step`: constant always, wsd before its decay."""
        return self.kind == "constant" or self.kind == "wsd" and step < self.decay_start()

    def shortest_total(self, step: int) -> int:
        """The fewest steps a run at `step` can be resized to: under wsd, the decay of the new
        length must lie wholly ahead."""
        total = step + 1
        while self.kind == "wsd" and self.decay_start(total) <= step:
            total += 1
        return total

    def resize(self, total: int, step: int) -> None:
        """Lengthen or shorten a run at `step` while its learning rate is still flat.

        Why: a wall-clock budget planned ahead can be re-planned from the run's own speed. The run
        keeps the warm-up it began with, its flat phase runs on, and (wsd) it decays over the last
        `decay_ratio` of the new length.
        """
        if self.kind not in ("wsd", "constant"):
            raise ValueError(f"a run's length can change mid-run only under a wsd or constant schedule, not {self.kind!r}")
        if self.kind == "wsd" and step >= min(self.decay_start(), self.decay_start(total)):
            raise ValueError(
                f"step {step}: a wsd run's length can change only before its decay (which starts at step "
                f"{self.decay_start()} now, and would at {self.decay_start(total)} for {total} steps)"
            )
        if total <= step:
            raise ValueError(f"cannot end a run at step {total}: it is at step {step}")
        self.total = total
