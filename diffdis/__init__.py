"""diffdis: one diffusion UNet that generates images from text and classifies zero-shot (DiffDis)."""

import logging

__version__ = "0.1.0"


class _NoTorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version without torchvision.

    diffusers' pipelines import CLIP/SigLIP image processors that diffdis never uses, so without torchvision
    every command would open with two lines of that notice. Every other transformers message is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
