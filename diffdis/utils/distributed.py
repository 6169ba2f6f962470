"""Summing and gathering across processes, with a plain single-process fallback.

Evaluation keeps per-process running sums and synchronises only those (a few tensors), never the
images they were computed from. Every function here is a collective: with more than one process,
every process must call it, in the same order.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch


def is_distributed(accelerator) -> bool:
    """True when ``accelerator`` runs more than one process (None: one process)."""
    return accelerator is not None and accelerator.num_processes > 1


def sum_over_processes(tensors: Dict[str, torch.Tensor], accelerator) -> Dict[str, torch.Tensor]:
    """Element-wise sums of ``tensors`` over all processes (same keys, devices and dtypes).

    The reduction runs on the accelerator's device (NCCL needs CUDA tensors, gloo takes CPU ones);
    float64 and int64 tensors keep their dtype, so sums of many images stay exact enough.

    Args:
        tensors: this process's tensors; every process passes the same keys and shapes.
        accelerator: an ``accelerate.Accelerator``, or None for one process (returns ``tensors``).
    """
    if not is_distributed(accelerator):
        return dict(tensors)
    moved = {name: t.detach().to(accelerator.device) for name, t in tensors.items()}
    summed = accelerator.reduce(moved, reduction="sum")
    return {name: summed[name].to(t.device) for name, t in tensors.items()}


def all_processes(flag: bool, accelerator) -> bool:
    """True when ``flag`` is true on every process (so that all take the same branch)."""
    misses = sum_over_processes({"misses": torch.tensor(0 if flag else 1, dtype=torch.long)}, accelerator)
    return int(misses["misses"]) == 0


def gather_objects(items: List[Any], accelerator) -> List[Any]:
    """Concatenate every process's list of picklable items, in rank order (for a few small items only)."""
    if not is_distributed(accelerator):
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))
