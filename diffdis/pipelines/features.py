"""What the zero-shot pipelines of contrastive models share: cosine similarity of normalised image and text features.

:class:`FeaturesZeroShotPipeline` gives the evaluation API's members (``encode_images``, ``encode_text``,
``discriminates``, ``resolution``) and ``__call__`` over two hooks a subclass writes: the raw image features of
pixels and the raw text features of token ids (:class:`~diffdis.pipelines.clip_pipeline.ClipZeroShotPipeline`,
:class:`~diffdis.pipelines.oner_pipeline.OneRZeroShotPipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from PIL import Image

from .base import CustomComponentsPipeline
from .zeroshot import ZeroShotModelError, tokenize

INDEX_NAME = "zeroshot_index.json"


@dataclass
class FeaturesPipelineOutput(BaseOutput):
    """``logits_per_image`` (B, N) cosine similarities; ``image_embeds`` (B, d) and ``text_embeds`` (N, d), normalised."""

    logits_per_image: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class FeaturesZeroShotPipeline(CustomComponentsPipeline):
    """Zero-shot classification and retrieval by the features of one model (the component ``model_cpu_offload_seq``
    names), with a tokenizer and the ``resolution`` the model was trained at in its config."""

    config_name = INDEX_NAME
    model_cpu_offload_seq: ClassVar[str]
    #: how errors name the model ("a CLIP model")
    model_label: ClassVar[str] = "this model"

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw image features (B, d) of pixels (B, 3, R, R) in [-1, 1]."""
        raise NotImplementedError

    def _text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw text features (N, d) of token ids (N, L)."""
        raise NotImplementedError

    @property
    def resolution(self) -> int:
        """Image side (pixels) of the data the model was trained on."""
        return int(self.config.resolution)

    @property
    def discriminates(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return getattr(self, self.model_cpu_offload_seq).device

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text features (N, d) of ``texts`` (float32)."""
        texts = list(texts)
        if not texts:
            raise ValueError("need at least one text")
        out = [self._text_features(tokenize(self.tokenizer, texts[i : i + batch_size], self.device))
               for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)  # (N, d)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator=None, *unused, **unused_kw) -> torch.Tensor:
        """Normalised image features (B, d) of pixels (B, 3, R, R) in [-1, 1] (deterministic: ``generator`` and the
        text-query settings of the DiffDis pipeline do not apply)."""
        return F.normalize(self._image_features(pixel_values).float(), dim=-1)  # (B, d)

    def diffusion_classifier_logits(self, *args, **kwargs) -> torch.Tensor:
        raise ZeroShotModelError(f"{self.model_label} has no diffusion classifier")

    def preprocess(self, images: Union[torch.Tensor, Image.Image, Sequence[Image.Image]]) -> torch.Tensor:
        """PIL images or a (B, 3, R, R) tensor in [-1, 1] -> pixel values in [-1, 1]."""
        from .zeroshot_pipeline import pil_to_pixels

        return images if isinstance(images, torch.Tensor) else pil_to_pixels(images, self.resolution)

    @torch.no_grad()
    def __call__(self, images, texts: Sequence[str], generator=None) -> FeaturesPipelineOutput:
        """Cosine similarity of every image with every text."""
        image_embeds = self.encode_images(self.preprocess(images))
        text_embeds = self.encode_text(texts).to(image_embeds.device)
        return FeaturesPipelineOutput(image_embeds @ text_embeds.T, image_embeds, text_embeds)
