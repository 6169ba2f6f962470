"""Where a training step's time goes: each arm's step profiled with ``torch.profiler``, split into named phases."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

# phases of a step, in order; an arm reports those it has (the reference has no discrimination pass, and its noise
# and timestep draws are "data"; ours draws them inside its passes)
PHASES = ("text_encoder", "data", "generation_forward", "discrimination_forward", "generation_backward",
          "discrimination_backward", "optimizer")
TOP_OPS = 8


@contextmanager
def modules_run(model: nn.Module) -> Iterator[List[str]]:
    """The names of ``model``'s direct children (the items of a ``ModuleList`` child, as ``down_blocks.0``) called
    inside the block, in order of their first call."""
    names: List[str] = []
    modules = []
    for name, child in model.named_children():
        items = child.named_children() if isinstance(child, nn.ModuleList) else [("", child)]
        modules.extend((f"{name}.{item}" if item else name, module) for item, module in items)

    def hook(name: str):
        return lambda module, args: names.append(name) if name not in names else None

    hooks = [module.register_forward_pre_hook(hook(name)) for name, module in modules]
    try:
        yield names
    finally:
        for handle in hooks:
            handle.remove()


def _phase(name: str):
    return record_function(f"phase/{name}")


def profile_steps(steps: Dict[str, Callable[..., float]], n: int, device: torch.device,
                  flops: Dict[str, int]) -> Dict[str, dict]:
    """Profile ``n`` steps of each arm (called as ``step(phase)``) after one warm-up step; ``flops``: each arm's
    FLOPs per step as :func:`benchmarks.accel.count_flops` counted them.

    Returns, for each arm: ``phases_ms`` (milliseconds per step in each phase, CPU time of its ``record_function``
    range; on CUDA, kernels run asynchronously and land where the CPU waits), ``step_ms`` (their sum),
    ``top_ops_ms`` (the operators of largest self CPU time per step) and ``gflop`` (forward and backward of one step
    as torch's FLOP counter counts them: matrix products, convolutions and attention; the optimiser is not counted).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: Dict[str, dict] = {}
    for name, step in steps.items():
        step(_phase)
        with profile(activities=activities) as prof:
            for _ in range(n):
                step(_phase)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        phases = {e.key[len("phase/"):]: e.cpu_time_total / 1e3 / n for e in events if e.key.startswith("phase/")}
        phases = {p: phases[p] for p in PHASES if p in phases}
        ops = sorted((e for e in events if not e.key.startswith("phase/")), key=lambda e: e.self_cpu_time_total,
                     reverse=True)[:TOP_OPS]
        out[name] = {"phases_ms": phases, "step_ms": sum(phases.values()),
                     "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 / n for e in ops},
                     "gflop": flops[name] / 1e9}
    return out
