"""Training: the Accelerate trainer, the DiffDis step module, checkpoints and history."""

from .module import DiffDisModule, StepOptions
from .trainer import train

__all__ = ["DiffDisModule", "StepOptions", "train"]
