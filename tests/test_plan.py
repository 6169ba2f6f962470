"""StepPlan (fitting a run into train.max_minutes) and the rebuilt LR schedule."""

from __future__ import annotations

import pytest
import torch
from accelerate.scheduler import AcceleratedScheduler
from diffusers.optimization import get_scheduler

from diffdis.train.plan import StepPlan, rebuild_lr_schedule


def _run(plan: StepPlan, seconds_per_step: float, until: int):
    messages = []
    for step in range(1, until + 1):
        msg = plan.observe(step, step, step * seconds_per_step)
        if msg:
            messages.append((step, msg))
    return messages


def test_plan_shrinks_to_fit_the_budget():
    plan = StepPlan(max_steps=10_000, max_minutes=1.0, measure_from=5, measure_steps=20, safety=1.0, min_steps=10)
    messages = _run(plan, 0.1, 100)  # 10 steps/s: 60 s hold 600 steps
    assert [s for s, _ in messages] == [25] and plan.planned
    assert plan.total == 25 + int(10 * (60 - 2.5))  # steps done + rate x remaining seconds
    assert "10.00 steps/s" in messages[0][1] and "training 600 steps" in messages[0][1]


def test_plan_keeps_max_steps_when_they_fit_and_without_budget():
    fits = StepPlan(max_steps=300, max_minutes=1.0, measure_from=5, measure_steps=20)
    assert "fit" in _run(fits, 0.1, 40)[0][1] and fits.total == 300
    unplanned = StepPlan(max_steps=300, max_minutes=None)
    assert _run(unplanned, 10.0, 40) == [] and unplanned.total == 300


def test_plan_state_round_trip():
    plan = StepPlan(1000, 0.01, measure_from=1, measure_steps=2, min_steps=5)
    _run(plan, 1.0, 5)
    other = StepPlan(1000, 0.01)
    other.load_state_dict(plan.state_dict())
    assert (other.total, other.planned) == (plan.total, True) and plan.total < 1000


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_rebuilt_schedule_matches_a_fresh_one(name):
    def make(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, AcceleratedScheduler(get_scheduler(name, opt, num_warmup_steps=10, num_training_steps=total), opt,
                                         step_with_optimizer=False)

    opt_a, a = make(1000)
    for _ in range(40):
        opt_a.step()
        a.step()
    rebuild_lr_schedule(a, name, 10, 200, num_processes=1)
    opt_b, b = make(200)
    for _ in range(40):
        opt_b.step()
        b.step()
    for _ in range(100):  # same learning rate at every later step
        assert a.get_last_lr()[0] == pytest.approx(b.get_last_lr()[0])
        opt_a.step(), a.step(), opt_b.step(), b.step()
