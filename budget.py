"""A training time budget (--time-budget, read by config.parse_duration): how many optimizer steps fit in what is left of it.

Pure arithmetic on times train.py measures (seconds per step, per evaluation); AutoGluon's time_limit is the model:
the run ends within the budget, the final report included.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAN_AFTER_STEPS = 8  # whole-network steps timed before the first plan (after two more that warm the kernels up)


@dataclass
class Budget:
    """The time a run may take, counted from `started` (time.perf_counter()), and what it is spent on."""

    seconds: float
    started: float
    eval_views: int = 1  # forward passes per image of the final report (its TTA views), beside the plain one
    final_images: float = 1.0  # images the final report scores, per validation image (val + test) / val

    def final_seconds(self, eval_seconds: float) -> float:
        """The end-of-training report: each final split scored plainly and with every TTA view."""
        return eval_seconds * self.final_images * (1 + self.eval_views)

    def deadline(self, eval_seconds: float) -> float:
        """When training must stop so the final report still ends within the budget."""
        return self.started + self.seconds - self.final_seconds(eval_seconds)

    def steps(self, now: float, step_seconds: float, steps_per_epoch: int, eval_seconds: float) -> int:
        """Optimizer steps that fit between `now` and the deadline, with a validation pass every steps_per_epoch
        steps (at least one step: past the deadline the run takes one and stops)."""
        left = self.deadline(eval_seconds) - now
        return max(1, int(left / (step_seconds + eval_seconds / steps_per_epoch)))
