"""What machine a result came from: the facts that decide its speed and its last digits.

Runs of the same code and seed repeat exactly on one machine but not across machines whose CPUs dispatch torch to
different kernels (AVX2 against AVX-512 round differently), and step times move with the CPU and with what else it
runs. Results that record this can be compared honestly: by their digits on one machine, by their spread across
machines.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``), else ``platform.processor()``, else the architecture."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _usable_cpus() -> Optional[int]:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count()


def host_record(device: Union[torch.device, str, None] = None) -> Dict[str, Any]:
    """The machine as JSON: CPU model, torch's CPU kernel level, usable CPUs, torch's version, and the CUDA
    device's name where ``device`` is one.

    Args:
        device: the device the result was computed on, a ``torch.device`` or its name (None or CPU: no GPU entry).
    """
    record: Dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. "AVX2", "AVX512": which kernels torch runs
        "usable_cpus": _usable_cpus(),
        "torch": torch.__version__,
    }
    if device is not None and torch.device(device).type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def describe_host(record: Dict[str, Any]) -> str:
    """One line for reports, e.g. ``AMD EPYC (AVX2), 2 CPUs, torch 2.13.0``."""
    cpus = record.get("usable_cpus")
    parts = [f"{record.get('cpu', 'unknown CPU')} ({record.get('cpu_capability', '?')})"]
    if cpus:
        parts.append(f"{cpus} CPU{'s' if cpus != 1 else ''}")
    if record.get("gpu"):
        parts.append(record["gpu"])
    parts.append(f"torch {record.get('torch', '?')}")
    return ", ".join(parts)
