"""CLIP: an image tower and the text tower trained with a symmetric InfoNCE loss and a learnable temperature.

The discriminative reference of every comparison (the CLIP baseline of DiffDis's Table 1). The model is a
``transformers.CLIPModel``: its vision tower is a ViT built from ``model.clip`` at ``data.resolution``, its text tower
starts as the run's text encoder (the same tokenizer, width and projection as the other methods). It reads pixels,
not latents, never generates, and saves itself as a :class:`~diffdis.pipelines.clip_pipeline.ClipZeroShotPipeline`.
"""

from __future__ import annotations

from typing import Tuple

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPVisionConfig

from ..config import ConfigError
from ..pipelines.clip_pipeline import ClipZeroShotPipeline, clip_vision_inputs
from .base import register
from .towers import ContrastiveTowersMethod


def build_clip(cfg, text_encoder: CLIPTextModelWithProjection) -> CLIPModel:
    """A ``CLIPModel`` whose vision tower follows ``model.clip`` and whose text tower is a copy of ``text_encoder``."""
    c, side = cfg.model.clip, cfg.data.resolution
    if not isinstance(text_encoder, CLIPTextModelWithProjection):
        raise ConfigError(f"method={cfg.method} needs a text encoder with a projection (the tiny text tower; not model.pretrained)")
    if side % c.patch_size:
        raise ConfigError(f"data.resolution={side} must be a multiple of model.clip.patch_size={c.patch_size}")
    text_config = text_encoder.config
    vision = CLIPVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, image_size=side, patch_size=c.patch_size,
        projection_dim=text_config.projection_dim,
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=text_config.projection_dim, logit_scale_init_value=c.logit_scale_init)
    clip = CLIPModel(config)
    clip.text_model.load_state_dict(text_encoder.text_model.state_dict())
    clip.text_projection.load_state_dict(text_encoder.text_projection.state_dict())
    return clip


@register("clip")
class ClipMethod(ContrastiveTowersMethod):
    """L = symmetric InfoNCE between image and text features of a ``CLIPModel`` (``loss_itc``).

    ``forward(pixels, input_ids, empty_ids, generator, gather=True, step=None)`` takes pixel values in [-1, 1]
    (``input_space = "pixels"``); ``empty_ids``, ``generator`` and ``step`` are unused (the loss is deterministic).
    """

    module_name = "clip"
    pipeline_class = ClipZeroShotPipeline

    @classmethod
    def from_config(cls, cfg, components) -> "ClipMethod":
        cls.check_and_freeze_components(cfg, components)  # the CLIP model has its own copy of the text tower
        return cls(build_clip(cfg, components.text_encoder), cfg.model.clip.logit_scale_max)

    def features(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        image = self.clip.get_image_features(pixel_values=clip_vision_inputs(self.clip, pixels)).pooler_output  # (B, d)
        text = self.clip.get_text_features(input_ids=input_ids).pooler_output  # (B, d)
        return image, text

    def configure_speed(self, cfg) -> None:
        if cfg.model.gradient_checkpointing:
            self.clip.gradient_checkpointing_enable()
