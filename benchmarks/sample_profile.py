"""Where a pipeline call's time goes: each arm's call under ``torch.profiler``, and the operators where they differ.

Written for the question of the sampling ratio on a GPU: is ours slower in its attention processors, in wrappers
around the UNet, in dtype casts or in host-device synchronisations? Each arm reports its operators' self time (device
time on CUDA, CPU time otherwise), its counts of synchronising calls, casts and kernel launches, and the operators that
take the most extra time in ours.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch.profiler import ProfilerActivity, profile

TOP = 15
# operators that make the host wait for the device (an .item(), a .cpu(), an explicit synchronise)
SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaMemcpy", "cudaMemcpyAsync")
CASTS = ("aten::to", "aten::_to_copy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")


def _self_ms(event, on_device: bool) -> float:
    return (event.self_device_time_total if on_device else event.self_cpu_time_total) / 1e3


def profile_calls(calls: Dict[str, Callable[[], object]], device: torch.device) -> Dict[str, object]:
    """Profile one call of each arm (already warmed up).

    Returns, for each arm: ``wall_ms`` (the profiled call's wall-clock, profiler overhead included), ``self_ms_total``
    and ``top_ops_ms`` (operators of largest self time: device time on CUDA, else CPU time), ``syncs``, ``casts``,
    ``kernel_launches`` and ``ops_called`` (call counts); and ``extra_in_ours_ms`` (the operators whose self time is
    most above the other arm's, ours minus it), when there are two arms and one is ``ours``.
    """
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    out: Dict[str, object] = {"time": "device" if on_device else "cpu"}
    per_op: Dict[str, Dict[str, float]] = {}
    for name, call in calls.items():
        with profile(activities=activities) as prof:
            call()
            if on_device:
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        times = {e.key: _self_ms(e, on_device) for e in events}
        counts = {e.key: e.count for e in events}
        per_op[name] = times
        top = sorted(times.items(), key=lambda kv: kv[1], reverse=True)[:TOP]
        out[name] = {
            "self_ms_total": sum(times.values()), "top_ops_ms": dict(top),
            "syncs": sum(counts.get(k, 0) for k in SYNCS), "casts": sum(counts.get(k, 0) for k in CASTS),
            "kernel_launches": sum(counts.get(k, 0) for k in LAUNCHES), "ops_called": sum(counts.values()),
        }
    others = [n for n in per_op if n != "ours"]
    if "ours" in per_op and len(others) == 1:
        ours, other = per_op["ours"], per_op[others[0]]
        extra = {k: ours.get(k, 0.0) - other.get(k, 0.0) for k in set(ours) | set(other)}
        out["extra_in_ours_ms"] = dict(sorted(extra.items(), key=lambda kv: kv[1], reverse=True)[:TOP])
    return out
