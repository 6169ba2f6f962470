"""diffdis: one diffusion UNet that generates images from text and classifies zero-shot (DiffDis)."""

__version__ = "0.1.0"
