"""Timing of DiffDisPipeline against a vanilla diffusers pipeline, in one process, interleaved."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from diffusers import DiffusionPipeline


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - start


def time_interleaved(calls: Dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds of each call in ``repeats`` rounds, after one warm-up call each.

    The calls take turns going first (round r starts at call r mod n), so drift in clock speed or caches hits
    all of them alike. Returns each name's list of per-round times.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for call in calls.values():  # warm-up: allocator, kernels, lazy imports
        call()
    names = list(calls)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_timed(calls[name], device))
    return times


def benchmark_sample(
    pipe_ours: DiffusionPipeline,
    pipe_vanilla: DiffusionPipeline,
    prompts: List[str],
    steps: int,
    repeats: int = 3,
    guidance_scale: float = 3.0,
    seed: int = 0,
    height: Optional[int] = None,
) -> dict:
    """Seconds per call of both pipelines on the same prompts, steps, guidance and seeds.

    One warm-up call each, then ``repeats`` rounds in which the two alternate who goes first (so drift in
    clock speed or caches hits both alike). Returns medians ``ours_s`` and ``vanilla_s`` and
    ``ratio = ours_s / vanilla_s`` (below 1: ours is faster), plus the raw per-round times. ``height`` sets
    the (square) image size of both; default: each pipeline's own.
    """
    device = pipe_ours._execution_device

    def run(pipe: DiffusionPipeline) -> Callable[[], object]:
        def call() -> object:
            gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
            return pipe(
                prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="np",
                height=height, width=height,
            )

        return call

    calls = {"ours": run(pipe_ours), "vanilla": run(pipe_vanilla)}
    for pipe in (pipe_ours, pipe_vanilla):
        pipe.set_progress_bar_config(disable=True)
    times = time_interleaved(calls, repeats, device)
    ours, vanilla = statistics.median(times["ours"]), statistics.median(times["vanilla"])
    return {
        "ours_s": ours,
        "vanilla_s": vanilla,
        "ratio": ours / vanilla,
        "ours_runs_s": times["ours"],
        "vanilla_runs_s": times["vanilla"],
        "steps": steps,
        "num_prompts": len(prompts),
    }
