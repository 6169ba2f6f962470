"""Wall-clock timing of calls that take turns, in one process."""

from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, queued GPU work included."""
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
            times[name].append(timed(calls[name], device))
    return times


def qualified_name(obj: object) -> str:
    """``module.Class`` of an object, so a result names exactly what ran."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
