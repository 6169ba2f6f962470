"""Training: the Accelerate trainer, checkpoints, history and evaluation during training (the methods' objectives
live in :mod:`diffdis.methods`)."""

from .trainer import train

__all__ = ["train"]
