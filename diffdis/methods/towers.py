"""The part that ``clip``, ``oner`` and ``rleg`` share: a model that embeds images (from pixels) and captions into one
space, trained with a symmetric InfoNCE loss and a learnable temperature, that never generates and saves itself as a
zero-shot pipeline.

A subclass names the trained model (``module_name``: its attribute, its checkpoint key and its pipeline's component),
the pipeline class, and how the model embeds a batch (:meth:`ContrastiveTowersMethod.features`).
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import ConfigError
from ..losses import data_parallel_contrastive_loss
from .base import Method


class ContrastiveTowersMethod(Method):
    """L = symmetric InfoNCE between the image and text features of ``self.model`` (``loss_itc``).

    ``forward(pixels, input_ids, empty_ids, generator, gather=True, step=None)`` takes pixel values in [-1, 1]
    (``input_space = "pixels"``); ``empty_ids``, ``generator`` and ``step`` are unused (the loss is deterministic).
    The model must have a 0-d ``logit_scale`` parameter (the log of the temperature's inverse).
    """

    input_space = "pixels"
    #: the trained model's attribute, checkpoint folder and pipeline component ("clip", "tower"); not "model"
    module_name: ClassVar[str]
    #: the zero-shot pipeline class, built as ``pipeline_class(<module_name>=model, tokenizer=..., resolution=..., method=...)``
    pipeline_class: ClassVar[type]

    def __init__(self, model: nn.Module, logit_scale_max: float = 100.0):
        super().__init__()
        setattr(self, self.module_name, model)
        self.logit_scale_max = logit_scale_max
        self.options = None

    @property
    def model(self) -> nn.Module:
        """The trained model, under its ``module_name``."""
        return getattr(self, self.module_name)

    @staticmethod
    def check_and_freeze_components(cfg, components) -> None:
        """Refuse a latent cache (these methods read pixels) and freeze the run's UNet, VAE and text encoder, which
        the method does not train (it has its own copy of what it needs)."""
        if cfg.data.cache_dir:
            raise ConfigError(f"method={cfg.method} reads pixels: data.cache_dir (a latent cache) does not apply")
        for unused in (components.unet, components.vae, components.text_encoder):
            if unused is not None:
                unused.requires_grad_(False)

    @classmethod
    def trains_generation(cls, loss) -> bool:
        return False

    @classmethod
    def trains_discrimination(cls, loss) -> bool:
        return True

    def loss_keys(self) -> List[str]:
        return ["loss", "loss_itc", "acc_i2t", "acc_t2i"]

    def features(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image features (B, d) of ``pixels`` (B, 3, R, R) and text features (B, d) of ``input_ids`` (B, L)."""
        raise NotImplementedError

    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at ``logit_scale_max`` (0-d)."""
        return self.model.logit_scale.exp().clamp(max=self.logit_scale_max)

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor, generator: torch.Generator,
                gather: bool = True, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        pixels = latents  # (B, 3, R, R) in [-1, 1]: this method's input space is pixels
        image, text = self.features(pixels, input_ids)  # (B, d), (B, d)
        scale = self.logit_scale()
        itc = data_parallel_contrastive_loss(image, text, scale, gather)
        loss = itc["loss"]
        return {"loss": loss, "loss_itc": loss, "acc_i2t": itc["acc_i2t"], "acc_t2i": itc["acc_t2i"],
                "logit_scale": scale.detach()}

    # ------------------------------------------------------------------ training set-up
    def param_groups(self, cfg) -> List[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": cfg.train.learning_rate}]

    def checkpoint_modules(self) -> Dict[str, nn.Module]:
        return {self.module_name: self.model}

    # ------------------------------------------------------------------ inference
    def text_to_image_pipeline(self, components, scheduler=None):
        raise ValueError(f"method={self.name} does not generate images")

    def zero_shot_pipeline(self, components, cfg):
        return self.pipeline_class(**{self.module_name: self.model}, tokenizer=components.tokenizer,
                                   resolution=cfg.data.resolution, method=self.name)

    def save_pretrained(self, folder, components, cfg) -> None:
        self.zero_shot_pipeline(components, cfg).save_pretrained(folder)
