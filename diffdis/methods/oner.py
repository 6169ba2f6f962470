"""OneR: one transformer with shared weights encodes images and captions, trained with a symmetric InfoNCE loss.

OneR (Kong et al., "Unifying Vision-Language Representation Space with Single-tower Transformer", AAAI 2023)
treats an image and its caption as two views of the same content and learns one modality-agnostic space with a
single tower. The model is a :class:`~diffdis.models.single_tower.SingleTowerModel` built from ``model.oner`` at
``data.resolution``, over the run's tokenizer (its own token embedding; the run's text encoder is not used). It
reads pixels, not latents, never generates, and saves itself as a
:class:`~diffdis.pipelines.oner_pipeline.OneRZeroShotPipeline`.

The loss is the cross-modal contrastive term only (image vs caption of the same pair, learnable temperature).
Where our reading fills gaps of the paper (not available offline): no additional objective (no intra-modal
contrast or masked modelling), the pooled feature is a shared [CLS] token, and one linear projection serves both
modalities; see :mod:`diffdis.models.single_tower` for the tower's own choices.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..config import ConfigError
from ..models.single_tower import SingleTowerConfig, SingleTowerModel
from ..pipelines.oner_pipeline import OneRZeroShotPipeline
from .base import register
from .towers import ContrastiveTowersMethod

MAX_TEXT_POSITIONS = 4096  # beyond this, the tokenizer's model_max_length is taken to be unset


def build_single_tower(cfg, tokenizer) -> SingleTowerModel:
    """A :class:`SingleTowerModel` shaped by ``model.oner`` for ``data.resolution`` images and ``tokenizer``'s text."""
    o, side = cfg.model.oner, cfg.data.resolution
    if side % o.patch_size:
        raise ConfigError(f"data.resolution={side} must be a multiple of model.oner.patch_size={o.patch_size}")
    if o.hidden_size % o.num_attention_heads:
        raise ConfigError(f"model.oner.hidden_size={o.hidden_size} must be a multiple of "
                          f"model.oner.num_attention_heads={o.num_attention_heads}")
    max_length = tokenizer.model_max_length
    if max_length > MAX_TEXT_POSITIONS:
        raise ConfigError(f"method=oner needs a tokenizer with a model_max_length (it has {max_length})")
    config = SingleTowerConfig(
        vocab_size=len(tokenizer), max_text_length=max_length, pad_token_id=tokenizer.pad_token_id,
        image_size=side, patch_size=o.patch_size, hidden_size=o.hidden_size, num_hidden_layers=o.num_hidden_layers,
        num_attention_heads=o.num_attention_heads, intermediate_size=o.intermediate_size,
        projection_dim=o.projection_dim or cfg.model.text_encoder.projection_dim, logit_scale_init=o.logit_scale_init,
    )
    return SingleTowerModel(config)


@register("oner")
class OneRMethod(ContrastiveTowersMethod):
    """L = symmetric InfoNCE between the image and text features of one shared tower (``loss_itc``).

    ``forward(pixels, input_ids, empty_ids, generator, gather=True, step=None)`` takes pixel values in [-1, 1]
    (``input_space = "pixels"``); ``empty_ids``, ``generator`` and ``step`` are unused (the loss is deterministic).
    """

    module_name = "tower"
    pipeline_class = OneRZeroShotPipeline

    @classmethod
    def from_config(cls, cfg, components) -> "OneRMethod":
        cls.check_and_freeze_components(cfg, components)  # the tower embeds the tokens itself
        return cls(build_single_tower(cfg, components.tokenizer), cfg.model.oner.logit_scale_max)

    def features(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        image = self.tower.encode_image(pixels)  # (B, d), through the shared transformer
        text = self.tower.encode_text(input_ids)  # (B, d), through the same transformer
        return image, text

    def configure_speed(self, cfg) -> None:
        if cfg.model.gradient_checkpointing:
            self.tower.activation_checkpointing_enable()
