"""Inference pipelines: text-to-image sampling (`DiffDisPipeline`), export to vanilla diffusers."""

from .export import export_stable_diffusion, export_unet, to_stable_diffusion
from .text_to_image import (
    DiffDisPipeline,
    load_pipeline,
    make_scheduler,
    scheduler_names,
    unet_downsample_factor,
    vae_scale_factor,
)

__all__ = [
    "DiffDisPipeline",
    "export_stable_diffusion",
    "export_unet",
    "load_pipeline",
    "make_scheduler",
    "scheduler_names",
    "to_stable_diffusion",
    "unet_downsample_factor",
    "vae_scale_factor",
]
