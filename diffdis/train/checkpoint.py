"""Checkpoints: ``Accelerator.save_state`` with hooks that write ``save_pretrained`` folders.

A checkpoint is written under a temporary name and renamed when complete, so an interrupted save
never becomes ``latest``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import List, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger


logger = get_logger("diffdis.train")

_CKPT = re.compile(r"^checkpoint-(\d+)$")


class GeneratorState:
    """Makes a ``torch.Generator`` checkpointable with ``Accelerator.register_for_checkpointing``."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class PerProcessState:
    """Checkpoints an object whose state differs per process (a generator, a stream position).

    ``Accelerator.register_for_checkpointing`` writes custom objects from the main process only, so a plain
    registration would resume every process with the main process's state. ``state_dict`` (called on every
    process by ``save_state``) gathers all processes' states; ``load_state_dict`` takes this process's own.
    """

    def __init__(self, obj, accelerator: Accelerator, name: str):
        self.obj = obj
        self.accelerator = accelerator
        self.name = name

    def state_dict(self) -> dict:
        from accelerate.utils import gather_object

        states = gather_object([self.obj.state_dict()]) if self.accelerator.num_processes > 1 else [self.obj.state_dict()]
        return {"per_process": states}

    def load_state_dict(self, state: dict) -> None:
        if "per_process" not in state:  # a checkpoint from before per-process states: the main process's state
            self.obj.load_state_dict(state)
            return
        states, n = state["per_process"], self.accelerator.num_processes
        if len(states) != n:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint's {self.name} state is from {len(states)} processes, this run has {n}; "
                "resume with the number of processes the checkpoint was made with"
            )
        self.obj.load_state_dict(states[self.accelerator.process_index])


class Counter:
    """A checkpointable count (unusable examples replaced in this process)."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["value"])


def list_checkpoints(output_dir: Path) -> List[Path]:
    """Complete checkpoints (``checkpoint-N``, no temporary ones), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """``"latest"`` -> newest complete checkpoint (None if there is none); a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: '{path}' is not a complete diffdis checkpoint")
    return path


def read_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def check_fits(saved: dict, current: dict, folder: Path) -> None:
    """Raise a one-line ``ValueError`` naming the first weight of ``folder`` that the configured model lacks or
    holds in another shape (a checkpoint made with a different model config)."""
    hint = "resume with the model config the checkpoint was made with"
    for key in sorted(set(saved) | set(current)):
        if key not in current:
            raise ValueError(f"resume_from_checkpoint: '{key}' is in '{folder}' but not in this config's model; {hint}")
        if key not in saved:
            raise ValueError(f"resume_from_checkpoint: '{key}' of this config's model is not in '{folder}'; {hint}")
        if saved[key].shape != current[key].shape:
            raise ValueError(
                f"resume_from_checkpoint: '{key}' is {list(saved[key].shape)} in '{folder}' but "
                f"{list(current[key].shape)} in this config's model; {hint}"
            )


def register_hooks(accelerator: Accelerator) -> None:
    """Save the method's trainable modules (:meth:`~diffdis.methods.Method.checkpoint_modules`: ``unet/`` and
    ``text_encoder/`` for the dual-stream methods) as ``save_pretrained`` folders, and load them back, refusing a
    checkpoint whose weights do not fit."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                for name, module in accelerator.unwrap_model(model).checkpoint_modules().items():
                    module.save_pretrained(Path(output_dir) / name)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            for name, module in accelerator.unwrap_model(models.pop()).checkpoint_modules().items():
                saved = type(module).from_pretrained(Path(input_dir) / name)
                check_fits(saved.state_dict(), module.state_dict(), Path(input_dir) / name)
                module.load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: Optional[int]) -> Path:
    """Write ``checkpoint-<step>`` atomically (all processes call this) and prune old ones."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final
