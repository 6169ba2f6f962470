"""Zero-shot classification and retrieval with a single-tower (OneR) model, as a saved ``DiffusionPipeline``.

:class:`OneRZeroShotPipeline` is what ``method=oner`` saves as its model folder (``zeroshot_index.json`` with a
``tower/`` :class:`~diffdis.models.single_tower.SingleTowerModel` and a ``tokenizer/``), scored through the same
evaluation API as the other pipelines (``encode_images``, ``encode_text``, ``discriminates``, ``resolution``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..models.single_tower import SingleTowerModel
from .base import CustomComponentsPipeline
from .zeroshot import ZeroShotModelError, tokenize

INDEX_NAME = "zeroshot_index.json"


@dataclass
class OneRPipelineOutput(BaseOutput):
    """``logits_per_image`` (B, N) cosine similarities; ``image_embeds`` (B, d) and ``text_embeds`` (N, d), normalised."""

    logits_per_image: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class OneRZeroShotPipeline(CustomComponentsPipeline):
    """Image and text features of one shared transformer.

    Args:
        tower: a :class:`~diffdis.models.single_tower.SingleTowerModel`.
        tokenizer: the run's tokenizer (pads to ``model_max_length``).
        resolution: the image side of the data the model was trained on (pixels in [-1, 1]).
        method: the training method (a record; read by :func:`diffdis.eval.api.applicable`).
        classifier, generates: what :func:`diffdis.eval.api.applicable` reads; always features, never generation.
    """

    config_name = INDEX_NAME
    model_cpu_offload_seq = "tower"

    def __init__(self, tower: SingleTowerModel, tokenizer: PreTrainedTokenizerBase, resolution: Optional[int] = None,
                 method: str = "oner", classifier: str = "text_query", generates: bool = False) -> None:
        super().__init__()
        if classifier != "text_query" or generates:
            raise ValueError("a OneR pipeline classifies by features (classifier='text_query') and does not generate")
        self.register_modules(tower=tower, tokenizer=tokenizer)
        self.register_to_config(resolution=int(resolution or tower.config.image_size), method=method,
                                classifier=classifier, generates=False)

    @property
    def resolution(self) -> int:
        """Image side (pixels) of the data the model was trained on."""
        return int(self.config.resolution)

    @property
    def discriminates(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return self.tower.device

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text features (N, d) of ``texts`` (float32)."""
        texts = list(texts)
        if not texts:
            raise ValueError("need at least one text")
        out = [self.tower.encode_text(tokenize(self.tokenizer, texts[i : i + batch_size], self.device))
               for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)  # (N, d)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator=None, *unused, **unused_kw) -> torch.Tensor:
        """Normalised image features (B, d) of pixels (B, 3, R, R) in [-1, 1] (deterministic: ``generator`` and the
        text-query settings of the DiffDis pipeline do not apply)."""
        return F.normalize(self.tower.encode_image(pixel_values).float(), dim=-1)  # (B, d)

    def diffusion_classifier_logits(self, *args, **kwargs) -> torch.Tensor:
        raise ZeroShotModelError("a OneR model has no diffusion classifier")

    def preprocess(self, images: Union[torch.Tensor, Image.Image, Sequence[Image.Image]]) -> torch.Tensor:
        """PIL images or a (B, 3, R, R) tensor in [-1, 1] -> pixel values in [-1, 1]."""
        from .zeroshot_pipeline import pil_to_pixels

        return images if isinstance(images, torch.Tensor) else pil_to_pixels(images, self.resolution)

    @torch.no_grad()
    def __call__(self, images, texts: Sequence[str], generator=None) -> OneRPipelineOutput:
        """Cosine similarity of every image with every text."""
        image_embeds = self.encode_images(self.preprocess(images))
        text_embeds = self.encode_text(texts).to(image_embeds.device)
        return OneRPipelineOutput(image_embeds @ text_embeds.T, image_embeds, text_embeds)
