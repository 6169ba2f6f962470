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


def release_accelerator_state() -> bool:
    """Forget the process-wide accelerate state that an earlier ``Accelerator`` of this process left behind.

    accelerate keeps its state (device, mixed precision, gradient accumulation) in per-process
    singletons, so a second ``Accelerator`` in the same Python process inherits the first one's
    settings, and one that asks for others fails: ``Accelerator(cpu=True)`` after a CUDA run raises
    "AcceleratorState has already been initialized ... pass `cpu=True`", as does another
    ``mixed_precision``. Entry points that build their own Accelerator (training, evaluation, the
    latent cache) call this first, so that running them one after another in one process (the demo,
    in-process tests) behaves as separate runs do.

    Returns:
        True when the state was cleared; False when a distributed process group is active (a launched
        multi-process run), whose state holds the process group's ranks and is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return True


def new_accelerator(**kwargs: Any):
    """An ``accelerate.Accelerator(**kwargs)`` built on a fresh state (:func:`release_accelerator_state`)."""
    from accelerate import Accelerator

    release_accelerator_state()
    return Accelerator(**kwargs)
