"""Zero-shot classification and retrieval with a CLIP model, as a saved ``DiffusionPipeline``.

:class:`ClipZeroShotPipeline` is what ``method=clip`` saves as its model folder (``zeroshot_index.json`` with a
``clip/`` ``CLIPModel`` and a ``tokenizer/``): the discriminative reference of every comparison, scored through the
same evaluation API as the DiffDis pipeline (``encode_images``, ``encode_text``, ``discriminates``, ``resolution``).
``method=unidiff`` saves it too, beside a text-to-image ``DiffDisPipeline`` (``model_index.json``) in the same folder,
and records ``generates=True`` so that FID and prompt adherence are scored on that pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import CLIPModel, PreTrainedTokenizerBase

from .base import CustomComponentsPipeline
from .zeroshot import ZeroShotModelError, tokenize

INDEX_NAME = "zeroshot_index.json"


@dataclass
class ClipPipelineOutput(BaseOutput):
    """``logits_per_image`` (B, N) cosine similarities; ``image_embeds`` (B, d) and ``text_embeds`` (N, d), normalised."""

    logits_per_image: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


def clip_vision_inputs(clip: CLIPModel, pixel_values: torch.Tensor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """Pixels (B, 3, R, R) in [-1, 1] -> the vision tower's input: resized to its ``image_size`` (bicubic) and
    normalised from [0, 1] with ``mean`` / ``std`` (the defaults keep [-1, 1])."""
    side = clip.config.vision_config.image_size
    x = pixel_values.to(device=clip.device, dtype=torch.float32)
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (((x + 1) / 2 - mean_t) / std_t).to(clip.dtype)  # (B, 3, side, side)


class ClipZeroShotPipeline(CustomComponentsPipeline):
    """Image and text features of a CLIP model.

    Args:
        clip: a ``transformers.CLIPModel``.
        tokenizer: its tokenizer (pads to ``model_max_length``).
        resolution: the image side of the data the model was trained on (images are resized to the vision tower's
            ``image_size`` and normalised with ``image_mean`` / ``image_std`` from [0, 1]).
        image_mean, image_std: per-channel normalisation (None: 0.5, which keeps pixels in [-1, 1], as a CLIP
            trained here sees them; a pretrained OpenAI CLIP uses its own).
        method: the training method (a record; read by :func:`diffdis.eval.api.applicable`).
        classifier: what :func:`diffdis.eval.api.applicable` reads; always features (``"text_query"``).
        generates: whether the model folder also holds a text-to-image ``DiffDisPipeline`` (``model_index.json``,
            ``method=unidiff``), read by :func:`diffdis.eval.api.applicable`; this pipeline itself never generates.
    """

    config_name = INDEX_NAME
    model_cpu_offload_seq = "clip"

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        resolution: Optional[int] = None,
        image_mean: Optional[List[float]] = None,
        image_std: Optional[List[float]] = None,
        method: str = "clip",
        classifier: str = "text_query",
        generates: bool = False,
    ) -> None:
        super().__init__()
        if classifier != "text_query":
            raise ValueError("a CLIP pipeline classifies by features (classifier='text_query')")
        self.register_modules(clip=clip, tokenizer=tokenizer)
        self.register_to_config(
            resolution=int(resolution or clip.config.vision_config.image_size), image_mean=list(image_mean or [0.5] * 3),
            image_std=list(image_std or [0.5] * 3), method=method, classifier=classifier, generates=bool(generates),
        )

    @property
    def resolution(self) -> int:
        """Image side (pixels) of the data the model was trained on."""
        return int(self.config.resolution)

    @property
    def discriminates(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text features (N, d) of ``texts`` (float32)."""
        texts = list(texts)
        if not texts:
            raise ValueError("need at least one text")
        out = [self.clip.get_text_features(input_ids=tokenize(self.tokenizer, texts[i : i + batch_size], self.device)).pooler_output
               for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)  # (N, d)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator=None, *unused, **unused_kw) -> torch.Tensor:
        """Normalised image features (B, d) of pixels (B, 3, R, R) in [-1, 1] (deterministic: ``generator`` and the
        text-query settings of the DiffDis pipeline do not apply)."""
        inputs = clip_vision_inputs(self.clip, pixel_values, self.config.image_mean, self.config.image_std)
        feats = self.clip.get_image_features(pixel_values=inputs).pooler_output
        return F.normalize(feats.float(), dim=-1)  # (B, d)

    def diffusion_classifier_logits(self, *args, **kwargs) -> torch.Tensor:
        raise ZeroShotModelError("a CLIP model has no diffusion classifier")

    def preprocess(self, images: Union[torch.Tensor, Image.Image, Sequence[Image.Image]]) -> torch.Tensor:
        """PIL images or a (B, 3, R, R) tensor in [-1, 1] -> pixel values in [-1, 1]."""
        from .zeroshot_pipeline import pil_to_pixels

        return images if isinstance(images, torch.Tensor) else pil_to_pixels(images, self.resolution)

    @torch.no_grad()
    def __call__(self, images, texts: Sequence[str], generator=None) -> ClipPipelineOutput:
        """Cosine similarity of every image with every text."""
        image_embeds = self.encode_images(self.preprocess(images))
        text_embeds = self.encode_text(texts).to(image_embeds.device)
        return ClipPipelineOutput(image_embeds @ text_embeds.T, image_embeds, text_embeds)
