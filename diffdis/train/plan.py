"""Fit a run into a wall-clock budget: measure the step rate once, then shorten the run and its LR schedule.

CPUs differ by 2x or more in speed (AVX-512 or not, shared cores), so a fixed step count gives a
different wall time on every machine. With ``train.max_minutes`` set, :class:`StepPlan` times steps
``measure_from .. measure_from + measure_steps`` and, if ``train.max_steps`` would not fit in the budget
at that rate, lowers the step total to what fits; the trainer then rebuilds the LR schedule for the new
total, so the learning rate still anneals to its end instead of being cut off half way. The plan is
saved in every checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

from typing import Optional

from diffusers.optimization import get_scheduler


class StepPlan:
    """The number of optimiser steps this run takes (checkpointable with ``register_for_checkpointing``).

    Args:
        max_steps: the configured total (never raised).
        max_minutes: the wall-clock budget of the training loop; None: no planning.
        measure_from: steps to skip before timing (warm-up of allocators and caches).
        measure_steps: steps timed.
        safety: fraction of the remaining time planned for (validation and checkpoints also take time).
        min_steps: never plan fewer steps than this.
    """

    def __init__(
        self,
        max_steps: int,
        max_minutes: Optional[float],
        measure_from: int = 10,
        measure_steps: int = 50,
        safety: float = 0.92,
        min_steps: int = 100,
    ) -> None:
        self.total = max_steps
        self.max_steps = max_steps
        self.max_minutes = max_minutes
        self.measure_from, self.measure_steps = measure_from, measure_steps
        self.safety, self.min_steps = safety, min_steps
        self.planned = max_minutes is None
        self._mark: Optional[tuple] = None  # (step, seconds) at the start of the timed window

    def observe(self, steps_done: int, step: int, elapsed_s: float) -> Optional[str]:
        """Call after every step. ``steps_done``: steps in this process run; ``step``: global step;
        ``elapsed_s``: seconds since the loop started. Returns a message when the plan is made."""
        if self.planned:
            return None
        if steps_done == self.measure_from:
            self._mark = (step, elapsed_s)
        if self._mark is None or steps_done < self.measure_from + self.measure_steps:
            return None
        rate = (step - self._mark[0]) / max(elapsed_s - self._mark[1], 1e-9)
        remaining = 60 * self.max_minutes - elapsed_s
        fit = step + int(rate * remaining * self.safety)
        self.planned = True
        need_min = (self.total - step) / rate / 60 + elapsed_s / 60
        if fit >= self.total:
            return f"at {rate:.2f} steps/s the {self.total} steps fit the {self.max_minutes:g}-minute budget (~{need_min:.1f} min)"
        old, self.total = self.total, max(min(fit, self.total), self.min_steps, step + 1)
        return (f"at {rate:.2f} steps/s, {old} steps would take ~{need_min:.1f} min, over the {self.max_minutes:g}-minute"
                f" budget (train.max_minutes): training {self.total} steps instead, LR schedule rescaled to them")

    def state_dict(self) -> dict:
        return {"total": self.total, "planned": self.planned}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.planned = int(state["total"]), bool(state["planned"])


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
