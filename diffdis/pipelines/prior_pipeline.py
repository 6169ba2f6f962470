"""Generating CLIP image embeddings from captions with a trained diffusion prior, as a saved ``DiffusionPipeline``.

:class:`DiffusionPriorPipeline` is what ``method=prior`` saves as its model folder (``prior_index.json`` over
``prior/`` (:class:`~diffdis.models.prior.DiffusionPrior`), ``scheduler/`` (the DDIM sampler on the training noise
schedule), ``clip/`` (a copy of the frozen ``CLIPModel`` whose embedding space the prior learned) and
``tokenizer/``)::

    embeds = generate_image_embeddings("outputs/prior/model", ["a red circle"], torch.Generator().manual_seed(0))

A prior neither classifies nor generates images: its folder has no ``zeroshot_index.json`` nor ``model_index.json``,
and the evaluation tools refuse it with one line (:func:`check_not_prior`). Its embeddings feed ``method=rleg``
(``model.rleg.prior``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import CLIPModel, PreTrainedTokenizerBase

from ..models.prior import DiffusionPrior
from .base import CustomComponentsPipeline
from .clip_pipeline import ClipZeroShotPipeline
from .zeroshot import ZeroShotModelError, sample_text_query, tokenize

INDEX_NAME = "prior_index.json"


@dataclass
class PriorPipelineOutput(BaseOutput):
    """``image_embeds`` (B, d): generated unit-norm CLIP image embeddings; ``text_embeds`` (B, d): the captions'
    unit-norm CLIP text embeddings they were generated from."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


class DiffusionPriorPipeline(CustomComponentsPipeline):
    """Caption -> CLIP image embedding, by DDIM sampling of a :class:`~diffdis.models.prior.DiffusionPrior`.

    Args:
        prior: the trained denoiser (predicts the clean scaled embedding).
        scheduler: a deterministic sampler (DDIM, ``prediction_type="sample"``) on the training noise schedule.
        clip: the frozen CLIP model whose embeddings the prior learned (its text tower encodes the captions).
        tokenizer: that CLIP model's tokenizer.
        resolution, image_mean, image_std: the CLIP model's image settings (as its
            :class:`~diffdis.pipelines.clip_pipeline.ClipZeroShotPipeline` saved them).
        num_inference_steps: default K of the sampler.
        guidance_scale: default classifier-free guidance ``g`` (diffusers' convention: ``u + g (c - u)``; <= 1 skips
            the unconditional pass).
        method: the training method (a record).
    """

    config_name = INDEX_NAME
    model_cpu_offload_seq = "clip->prior"

    def __init__(self, prior: DiffusionPrior, scheduler: SchedulerMixin, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase,
                 resolution: Optional[int] = None, image_mean: Optional[List[float]] = None,
                 image_std: Optional[List[float]] = None, num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 method: str = "prior") -> None:
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        self.register_modules(prior=prior, scheduler=scheduler, clip=clip, tokenizer=tokenizer)
        self.register_to_config(
            resolution=int(resolution or clip.config.vision_config.image_size), image_mean=list(image_mean or [0.5] * 3),
            image_std=list(image_std or [0.5] * 3), num_inference_steps=int(num_inference_steps),
            guidance_scale=float(guidance_scale), method=method,
        )

    @property
    def device(self) -> torch.device:
        return self.prior.device

    @property
    def embedding_dim(self) -> int:
        """d, the width of the generated embeddings (the CLIP model's projection width)."""
        return int(self.prior.config.embedding_dim)

    @property
    def resolution(self) -> int:
        """Image side (pixels) of the data the CLIP model was trained on."""
        return int(self.config.resolution)

    def clip_pipeline(self) -> ClipZeroShotPipeline:
        """The frozen CLIP model's image and text features (the space the prior generates in)."""
        c = self.config
        return ClipZeroShotPipeline(clip=self.clip, tokenizer=self.tokenizer, resolution=c.resolution,
                                    image_mean=c.image_mean, image_std=c.image_std)

    @torch.no_grad()
    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP text embeddings (B, d) of token ids (B, L) of :attr:`tokenizer`."""
        feats = self.clip.get_text_features(input_ids=input_ids.to(self.clip.device)).pooler_output  # (B, d)
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, prompt: Optional[Union[str, Sequence[str]]] = None, input_ids: Optional[torch.Tensor] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """Generate one image embedding per caption.

        Args:
            prompt: captions (or one caption); or give ``input_ids`` (B, L) of :attr:`tokenizer` instead.
            num_inference_steps, guidance_scale: override the saved K and g.
            generator: seeds the initial noise (drawn on the CPU, so a seed gives the same embeddings on any device).
            return_dict: return a :class:`PriorPipelineOutput` (else ``(image_embeds, text_embeds)``).
        """
        if (prompt is None) == (input_ids is None):
            raise ValueError("give either prompt or input_ids")
        if prompt is not None:
            input_ids = tokenize(self.tokenizer, [prompt] if isinstance(prompt, str) else list(prompt), self.clip.device)
        steps = num_inference_steps or self.config.num_inference_steps
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        text = self.text_embeds(input_ids).to(device=self.device, dtype=self.prior.dtype)  # (B, d)
        b, scale = text.shape[0], self.prior.embedding_scale
        x = torch.randn(b, self.embedding_dim, generator=generator).to(device=self.device, dtype=self.prior.dtype)  # (B, d)
        self.scheduler.set_timesteps(steps, device=self.device)
        guided = guidance > 1.0
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]) if guided else None

        def model_fn(sample, t):
            if not guided:
                return self.prior(sample, t, text).sample  # (B, d)
            cond, uncond = self.prior(sample.repeat(2, 1), t, text.repeat(2, 1), drop_text=drop).sample.chunk(2)
            return uncond + guidance * (cond - uncond)  # (B, d)

        x = sample_text_query(model_fn, x, self.scheduler, disable=True)  # (B, d): the clean scaled embedding
        image = F.normalize(x.float() / scale, dim=-1)  # (B, d)
        return PriorPipelineOutput(image, text.float()) if return_dict else (image, text.float())


def is_prior_folder(folder: Union[str, os.PathLike]) -> bool:
    """Whether ``folder`` holds a saved :class:`DiffusionPriorPipeline` (``prior_index.json``)."""
    return (Path(folder) / INDEX_NAME).is_file()


def check_not_prior(folder: Union[str, os.PathLike]) -> None:
    """Raise :class:`~diffdis.pipelines.zeroshot.ZeroShotModelError` for a prior folder: it has nothing to evaluate."""
    if is_prior_folder(folder):
        raise ZeroShotModelError(f"'{folder}' is a diffusion prior (method=prior): it neither classifies nor generates "
                                 "images, so there is nothing to evaluate; its embeddings are for model.rleg.prior")


def load_prior_pipeline(folder: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.float32) -> DiffusionPriorPipeline:
    """Load a prior folder (``<output_dir>/model`` of ``method=prior``) in eval mode on ``device``.

    Raises:
        ZeroShotModelError: the folder does not exist or is not a prior folder (naming what it is instead).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ZeroShotModelError(f"model folder '{folder}' does not exist")
    if not is_prior_folder(folder):
        index = folder / "zeroshot_index.json"
        what = json.loads(index.read_text()).get("method") if index.is_file() else None
        raise ZeroShotModelError(f"'{folder}' is not a prior folder (no {INDEX_NAME}"
                                 + (f"; it holds a model of method {what!r})" if what else ")"))
    pipe = DiffusionPriorPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.prior, pipe.clip):
        module.requires_grad_(False).eval()
    return pipe.to(device)


def generate_image_embeddings(prior: Union[str, os.PathLike, DiffusionPriorPipeline],
                              texts: Optional[Sequence[str]] = None, input_ids: Optional[torch.Tensor] = None,
                              generator: Optional[torch.Generator] = None, num_inference_steps: Optional[int] = None,
                              guidance_scale: Optional[float] = None) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (B, d) generated from captions by a trained prior.

    Args:
        prior: a prior folder (loaded on the CPU) or a loaded :class:`DiffusionPriorPipeline`.
        texts: captions; or ``input_ids`` (B, L) of the prior's tokenizer.
        generator: seeds the noise: the same generator state gives the same embeddings.
        num_inference_steps, guidance_scale: override the prior's saved K and g.
    """
    pipe = prior if isinstance(prior, DiffusionPriorPipeline) else load_prior_pipeline(prior)
    return pipe(texts, input_ids, num_inference_steps, guidance_scale, generator).image_embeds
