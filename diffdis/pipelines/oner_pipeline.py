"""Zero-shot classification and retrieval with a single-tower (OneR) model, as a saved ``DiffusionPipeline``.

:class:`OneRZeroShotPipeline` is what ``method=oner`` saves as its model folder (``zeroshot_index.json`` with a
``tower/`` :class:`~diffdis.models.single_tower.SingleTowerModel` and a ``tokenizer/``), scored through the same
evaluation API as the other pipelines (``encode_images``, ``encode_text``, ``discriminates``, ``resolution``).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase

from ..models.single_tower import SingleTowerModel
from .features import INDEX_NAME, FeaturesPipelineOutput, FeaturesZeroShotPipeline

__all__ = ["INDEX_NAME", "OneRPipelineOutput", "OneRZeroShotPipeline"]


OneRPipelineOutput = FeaturesPipelineOutput  # logits_per_image, image_embeds, text_embeds


class OneRZeroShotPipeline(FeaturesZeroShotPipeline):
    """Image and text features of one shared transformer.

    Args:
        tower: a :class:`~diffdis.models.single_tower.SingleTowerModel`.
        tokenizer: the run's tokenizer (pads to ``model_max_length``).
        resolution: the image side of the data the model was trained on (pixels in [-1, 1]).
        method: the training method (a record; read by :func:`diffdis.eval.api.applicable`).
        classifier, generates: what :func:`diffdis.eval.api.applicable` reads; always features, never generation.
    """

    model_cpu_offload_seq = "tower"
    model_label = "a OneR model"

    def __init__(self, tower: SingleTowerModel, tokenizer: PreTrainedTokenizerBase, resolution: Optional[int] = None,
                 method: str = "oner", classifier: str = "text_query", generates: bool = False) -> None:
        super().__init__()
        if classifier != "text_query" or generates:
            raise ValueError("a OneR pipeline classifies by features (classifier='text_query') and does not generate")
        self.register_modules(tower=tower, tokenizer=tokenizer)
        self.register_to_config(resolution=int(resolution or tower.config.image_size), method=method,
                                classifier=classifier, generates=False)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower.encode_image(pixel_values)  # (B, d)

    def _text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tower.encode_text(input_ids)  # (N, d)
