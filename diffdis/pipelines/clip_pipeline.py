"""Zero-shot classification and retrieval with a CLIP model, as a saved ``DiffusionPipeline``.

:class:`ClipZeroShotPipeline` is what ``method=clip`` saves as its model folder (``zeroshot_index.json`` with a
``clip/`` ``CLIPModel`` and a ``tokenizer/``): the discriminative reference of every comparison, scored through the
same evaluation API as the DiffDis pipeline (``encode_images``, ``encode_text``, ``discriminates``, ``resolution``).
``method=unidiff`` saves it too, beside a text-to-image ``DiffDisPipeline`` (``model_index.json``) in the same folder,
and records ``generates=True`` so that FID and prompt adherence are scored on that pipeline.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from transformers import CLIPModel, PreTrainedTokenizerBase

from .features import INDEX_NAME, FeaturesPipelineOutput, FeaturesZeroShotPipeline

__all__ = ["INDEX_NAME", "ClipPipelineOutput", "ClipZeroShotPipeline", "clip_vision_inputs"]


ClipPipelineOutput = FeaturesPipelineOutput  # logits_per_image, image_embeds, text_embeds


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


class ClipZeroShotPipeline(FeaturesZeroShotPipeline):
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

    model_cpu_offload_seq = "clip"
    model_label = "a CLIP model"

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

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        inputs = clip_vision_inputs(self.clip, pixel_values, self.config.image_mean, self.config.image_std)
        return self.clip.get_image_features(pixel_values=inputs).pooler_output  # (B, d)

    def _text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids).pooler_output  # (N, d)
