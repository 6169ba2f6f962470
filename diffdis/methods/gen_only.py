"""Generation only: the dual-stream UNet trained on L_IG alone (the paper's single-task generative reference).

The text stream stays as initialised and untrained; zero-shot classification uses the diffusion classifier
(Li et al. 2023: the class prompt under which the UNet denoises the image best), which needs no text stream.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..models.components import encode_text
from .base import register
from .diffdis import DiffDisMethod


@register("gen_only")
class GenOnlyMethod(DiffDisMethod):
    """L = L_IG: :class:`DiffDisMethod`'s generation pass, with the text stream frozen."""

    zero_shot = "diffusion_classifier"

    @classmethod
    def from_config(cls, cfg, components) -> "GenOnlyMethod":
        method = super().from_config(cfg, components)
        projection = getattr(components.text_encoder, "text_projection", None)
        if projection is not None:  # it makes only the text query, which generation does not use
            projection.requires_grad_(False)
        return method

    @classmethod
    def find_unused_parameters(cls, cfg) -> bool:
        return not cfg.model.train_text_encoder  # the text stream is frozen, so it is never in the graph

    @classmethod
    def trains_discrimination(cls, loss) -> bool:
        return False

    def loss_keys(self) -> List[str]:
        return ["loss", "loss_ig"]

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor, generator: torch.Generator,
                gather: bool = True, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        full = latents.shape[0]
        ctx_all, _ = encode_text(self.text_encoder, torch.cat([input_ids, empty_ids]))
        loss_ig = self.generation_loss(latents, ctx_all[:full], ctx_all[full:], generator)  # (B, L, d), (1, L, d)
        return {"loss": loss_ig, "loss_ig": loss_ig}
