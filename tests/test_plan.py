"""StepPlan (fitting a run into train.max_minutes) and the rebuilt LR schedule."""

from __future__ import annotations

import pytest
import torch
from accelerate.scheduler import AcceleratedScheduler
from diffusers.optimization import get_scheduler

from diffdis.train.plan import StepPlan, rebuild_lr_schedule


def _run(plan: StepPlan, seconds_per_step: float, until: int):
    return _run_from(plan, 0, [(s, seconds_per_step) for s in range(1, until + 1)])


def _run_from(plan: StepPlan, done: int, steps):
    """Feed (step, seconds it took) pairs; elapsed time is the sum, starting at ``done`` steps of the same pace."""
    messages, elapsed = [], sum(dt for _, dt in steps[:0]) + done * (steps[0][1] if steps else 0)
    for step, dt in steps:
        elapsed += dt
        msg = plan.observe(step, step, elapsed)
        if msg:
            messages.append((step, msg))
    return messages


def test_plan_shrinks_to_fit_the_budget_then_rechecks():
    plan = StepPlan(max_steps=10_000, max_minutes=1.0, measure_from=5, measure_steps=20, safety=1.0,
                    recheck_fraction=0.5, recheck_safety=1.0, min_steps=10)
    messages = _run(plan, 0.1, 100)  # 10 steps/s: 60 s hold 600 steps
    assert [s for s, _ in messages][0] == 25
    first = plan.total
    assert abs(first - (25 + 10 * (60 - 2.5))) <= 1  # steps done + rate x remaining seconds
    assert "10.00 steps/s" in messages[0][1] and f"training {first} steps" in messages[0][1]
    assert not plan.planned  # the recheck is pending
    messages = _run_from(plan, 100, [(s, 0.1) for s in range(101, 400)])
    recheck_at = 25 + int(0.5 * (first - 25))
    assert [s for s, _ in messages] == [recheck_at] and plan.planned and abs(plan.total - 600) <= 1
    assert messages[0][1].startswith("rechecked: ")


def test_recheck_raises_a_pessimistic_first_estimate():
    """Early steps are slow (warm-up); the recheck gives the budget back, up to max_steps."""
    plan = StepPlan(max_steps=1000, max_minutes=1.0, measure_from=5, measure_steps=20, safety=1.0, recheck_safety=1.0)
    elapsed, msgs = 0.0, []
    for step in range(1, 1001):
        elapsed += 0.2 if step <= 25 else 0.05  # 5 steps/s, then 20 steps/s
        msg = plan.observe(step, step, elapsed)
        if msg:
            msgs.append(msg)
        if plan.planned:
            break
    assert len(msgs) == 2 and plan.total == 1000 and "all 1000 steps fit" in msgs[1]


def test_plan_keeps_max_steps_when_they_fit_and_without_budget():
    fits = StepPlan(max_steps=300, max_minutes=1.0, measure_from=5, measure_steps=20)
    assert "fit" in _run(fits, 0.1, 40)[0][1] and fits.total == 300
    unplanned = StepPlan(max_steps=300, max_minutes=None)
    assert _run(unplanned, 10.0, 40) == [] and unplanned.total == 300 and unplanned.planned


def test_plan_state_round_trip():
    plan = StepPlan(1000, 0.01, measure_from=1, measure_steps=2, min_steps=5)
    _run(plan, 1.0, 3)  # the first estimate only
    other = StepPlan(1000, 0.01)
    other.load_state_dict(plan.state_dict())
    assert other.total == plan.total < 1000
    assert other.phase == 0  # a pending recheck is timed again after a resume
    other.load_state_dict({"total": 7, "phase": 2})
    assert other.planned and other.total == 7


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
