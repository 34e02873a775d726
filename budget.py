"""A training time budget (--time-budget, read by config.parse_duration): how many optimizer steps fit in what is left.

Pure arithmetic on times train.py measures (seconds per step, per epoch's validation and saving); AutoGluon's
time_limit is the model. The budget covers training and the final evaluation; loading the data comes before it,
and logging the model to MLflow after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PLAN_AFTER_STEPS = 8  # whole-network steps timed before the first plan (after two more that warm the kernels up)
KEEP_EPOCHS = 0.5  # a budget that holds fewer than this share of the chosen epochs at the chosen size lowers the size
TRAINING_SHARE = 0.8  # of a budget, spent on training steps when the size is chosen (the rest: validation, reports)
SMALLEST_SIZE = 96  # the lowest input size a budget chooses


@dataclass
class Budget:
    """The time a run may take, counted from `started` (time.perf_counter()), and what its final report costs."""

    seconds: float
    started: float
    views: int = 0  # validation passes at the end beside the plain one: TTA views, the averaged weights (--average-best)
    test_share: float = 0.0  # test images per validation image (the test split is scored once, without TTA)
    world: int = 1  # processes: each times its shard of validation, the final report runs on one

    def final_seconds(self, eval_seconds: float) -> float:
        """The end-of-training report, from the time of one validation pass on this process's shard."""
        return eval_seconds * self.world * (1 + self.views + self.test_share)

    def deadline(self, eval_seconds: float) -> float:
        """When training must stop so the final report still ends within the budget."""
        return self.started + self.seconds - self.final_seconds(eval_seconds)

    def steps(self, now: float, step_seconds: float, steps_per_epoch: int, per_epoch: float, eval_seconds: float,
              done: int = 0) -> int:
        """Optimizer steps that fit between `now` and the deadline, `done` steps into an epoch. Every epoch spends
        per_epoch seconds beside its steps (the validation pass, checkpoints, logging); the last epoch may be cut
        short when its steps and that still fit. 0 when nothing more does."""
        left = self.deadline(eval_seconds) - now
        full = steps_per_epoch * step_seconds + per_epoch
        this_epoch = steps_per_epoch - done
        finish_this = this_epoch * step_seconds + per_epoch
        if left < finish_this:  # this epoch is the last, cut short
            return max(0, math.floor((left - per_epoch) / step_seconds))
        left -= finish_this
        whole = math.floor(left / full)
        left -= whole * full
        return this_epoch + whole * steps_per_epoch + max(0, math.floor((left - per_epoch) / step_seconds))


def budget_size(seconds: float, size: int, step_seconds: float, steps: int) -> int:
    """The input size to train at within `seconds`: `size` when at least KEEP_EPOCHS of the `steps` fit at
    step_seconds each, else smaller, so that they do (a step's time taken as proportional to the pixels), in
    multiples of 32 and not below SMALLEST_SIZE. The run's epochs are then fitted to the budget as it goes."""
    share = TRAINING_SHARE * seconds / max(steps * step_seconds, 1e-9)
    if share >= KEEP_EPOCHS or size <= SMALLEST_SIZE:
        return size
    return max(SMALLEST_SIZE, 32 * int(size * math.sqrt(share / KEEP_EPOCHS) // 32))
