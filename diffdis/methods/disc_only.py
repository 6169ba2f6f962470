"""Discrimination only: L_ITA through the dual-stream UNet's shared image branch, no L_IG (the paper's
single-task discriminative reference).

The image (clean latents) conditions the text stream through the same UNet blocks that DiffDis shares with
generation; nothing trains the UNet to denoise images, so the model is scored on zero-shot classification and
retrieval only.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..models.components import encode_text
from .base import register
from .diffdis import DiffDisMethod


@register("disc_only")
class DiscOnlyMethod(DiffDisMethod):
    """L = L_ITA: :class:`DiffDisMethod`'s discrimination pass on the whole batch (``loss.ita_fraction`` applies)."""

    @classmethod
    def find_unused_parameters(cls, cfg) -> bool:
        return True  # the UNet's generation-only parts (its output head, the image stream's upper blocks) get no gradient

    @classmethod
    def trains_generation(cls, loss) -> bool:
        return False

    @classmethod
    def trains_discrimination(cls, loss) -> bool:
        return True

    def loss_keys(self) -> List[str]:
        return ["loss", "loss_ita", "acc_i2t", "acc_t2i"]

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor, generator: torch.Generator,
                gather: bool = True, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        full = latents.shape[0]
        ctx_all, query_all = encode_text(self.text_encoder, torch.cat([input_ids, empty_ids]))
        ita = self.discrimination_loss(latents, query_all[:full], ctx_all[full:], generator, gather)  # (B, d_e), (1, L, d)
        loss = ita.pop("loss")
        return {"loss": loss, "loss_ita": loss, **ita}
