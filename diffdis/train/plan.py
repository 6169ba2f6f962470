"""Fit a run into a wall-clock budget: measure the step rate once, then shorten the run and its LR schedule.

CPUs differ by 2x or more in speed (seen here: 3.4 and 1.8 steps/s for the same config on two 2-core
machines), so a fixed step count gives a different wall time on every machine. With ``train.max_minutes``
set, :class:`StepPlan` times the steps after warm-up and, if ``train.max_steps`` would not fit in the budget
at that rate, lowers the step total to what fits, then rechecks once over a longer window; the trainer
rebuilds the LR schedule for each new total, so the learning rate still anneals to its end instead of
being cut off half way. The plan is saved in every checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

from typing import Optional

from diffusers.optimization import get_scheduler


class StepPlan:
    """The number of optimiser steps this run takes (checkpointable with ``register_for_checkpointing``).

    Two estimates: a first one right after warm-up (steps ``measure_from .. measure_from + measure_steps``),
    which is pessimistic because early steps are slower, then a recheck over a longer window that ends
    ``recheck_fraction`` of the way through the remaining plan and includes validation and evaluation
    time. Each sets the total to what fits, never above ``max_steps``.

    Args:
        max_steps: the configured total (never exceeded).
        max_minutes: the wall-clock budget of the training loop; None: no planning.
        measure_from: steps to skip before timing (warm-up of allocators and caches).
        measure_steps: steps timed for the first estimate.
        safety: fraction of the remaining time the first estimate plans for.
        recheck_fraction: where the recheck happens, as a fraction of the steps left after the first estimate.
        recheck_safety: fraction of the remaining time the recheck plans for.
        min_steps: never plan fewer steps than this.
    """

    def __init__(
        self,
        max_steps: int,
        max_minutes: Optional[float],
        measure_from: int = 10,
        measure_steps: int = 50,
        safety: float = 0.92,
        recheck_fraction: float = 0.35,
        recheck_safety: float = 0.96,
        min_steps: int = 100,
    ) -> None:
        self.total = max_steps
        self.max_steps = max_steps
        self.max_minutes = max_minutes
        self.measure_from, self.measure_steps = measure_from, measure_steps
        self.safety, self.recheck_fraction, self.recheck_safety = safety, recheck_fraction, recheck_safety
        self.min_steps = min_steps
        self.phase = 2 if max_minutes is None else 0  # 0: first estimate pending, 1: recheck pending, 2: done
        self._mark: Optional[tuple] = None  # (step, seconds) at the start of the timed window
        self._recheck_at = 0

    @property
    def planned(self) -> bool:
        """Whether the plan is final."""
        return self.phase == 2

    def observe(self, steps_done: int, step: int, elapsed_s: float) -> Optional[str]:
        """Call after every step. ``steps_done``: steps in this process run; ``step``: global step;
        ``elapsed_s``: seconds since the loop started. Returns a message when the total is (re)set."""
        if self.phase == 2:
            return None
        if self.phase == 0:
            if steps_done == self.measure_from:
                self._mark = (step, elapsed_s)
            if self._mark is None or steps_done < self.measure_from + self.measure_steps:
                return None
            message = self._fit(step, elapsed_s, self.safety, "")
            self.phase, self._mark = 1, (step, elapsed_s)
            self._recheck_at = step + max(self.measure_steps, int(self.recheck_fraction * (self.total - step)))
            return message
        if step < self._recheck_at:
            return None
        self.phase = 2
        return self._fit(step, elapsed_s, self.recheck_safety, "rechecked: ")

    def _fit(self, step: int, elapsed_s: float, safety: float, prefix: str) -> str:
        rate = (step - self._mark[0]) / max(elapsed_s - self._mark[1], 1e-9)
        remaining = 60 * self.max_minutes - elapsed_s
        fit = step + int(rate * remaining * safety)
        old = self.total
        self.total = int(min(self.max_steps, max(fit, self.min_steps, step + 1)))
        need_min = elapsed_s / 60 + (self.max_steps - step) / rate / 60
        if self.total == self.max_steps:
            return f"{prefix}at {rate:.2f} steps/s all {self.max_steps} steps fit the {self.max_minutes:g}-minute budget (~{need_min:.1f} min)"
        return (f"{prefix}at {rate:.2f} steps/s, {self.max_steps} steps would take ~{need_min:.1f} min, over the"
                f" {self.max_minutes:g}-minute budget (train.max_minutes): training {self.total} steps"
                f"{'' if old == self.total else f' (was {old})'}, LR schedule rescaled to them")

    def state_dict(self) -> dict:
        return {"total": self.total, "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state["total"])
        phase = int(state.get("phase", 2 if state.get("planned") else 0))
        self.phase = 0 if phase == 1 else phase  # a pending recheck starts its timing again after a resume


def rebuild_lr_schedule(lr_scheduler, name: str, warmup_steps: int, total_steps: int, num_processes: int) -> None:
    """Swap the schedule inside an ``AcceleratedScheduler`` for one ending at ``total_steps``, at the same position.

    Accelerate steps the inner scheduler once per process per optimiser step, hence the factor.
    """
    inner = lr_scheduler.scheduler
    lr_scheduler.scheduler = get_scheduler(
        name,
        inner.optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
        last_epoch=inner.last_epoch - 1,  # LambdaLR's constructor takes one step
    )
