"""Zero-shot classification and retrieval as a saved ``DiffusionPipeline``.

:class:`DiffDisZeroShotPipeline` holds the UNet, text encoder, tokenizer, noise scheduler and (optional) VAE of a
trained model, and in its config everything inference needs: γ (``text_scale``), K (``num_inference_steps``), w
(``guidance_scale``), the text-query sampler, which classifier the model provides and the image size. The trainer
saves it in the model folder beside the text-to-image ``DiffDisPipeline``: both share the component subfolders,
each has its own index (``model_index.json``; ``zeroshot_index.json`` here), so the weights are stored once::

    pipe = DiffDisZeroShotPipeline.from_pretrained("outputs/run/model")
    out = pipe(images, ["a red circle", "a blue square"])   # out.logits_per_image: (B, 2)

Nothing at inference reads the training config (``diffdis_config.yaml`` is a record of the run only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.components import encode_text, vae_scale_factor
from .base import CustomComponentsPipeline
from .zeroshot import (
    TEXT_SCHEDULERS,
    GeneratorArg,
    TextQuerySampler,
    ZeroShotModelError,
    check_dual_stream_folder,
    class_contexts,
    diffusion_classifier_logits,
    images_to_latents,
    tokenize,
)

CLASSIFIERS = ("text_query", "diffusion_classifier")  # how a model classifies zero-shot
INDEX_NAME = "zeroshot_index.json"


@dataclass
class ZeroShotPipelineOutput(BaseOutput):
    """``logits_per_image`` (B, N): cosine similarities (text queries) or negative denoising errors (diffusion
    classifier) of each image against each text; ``image_embeds`` (B, d) and ``text_embeds`` (N, d), normalised,
    or None for the diffusion classifier."""

    logits_per_image: torch.Tensor
    image_embeds: Optional[torch.Tensor]
    text_embeds: Optional[torch.Tensor]


class DiffDisZeroShotPipeline(CustomComponentsPipeline):
    """Zero-shot classification and retrieval with a DiffDis model (Algorithm 3, or the diffusion classifier).

    Args:
        unet: the trained ``DualStreamUNet``.
        text_encoder, tokenizer: the text tower (its normalised pooled output is the text query).
        scheduler: the training noise scheduler (the text sampler and the diffusion classifier reuse its schedule).
        vae: optional; None means pixel space.
        text_scale: γ of the text forward process the model was trained with.
        num_inference_steps: K, denoising steps of the image-side text query.
        guidance_scale: w in ``(1 + w)Φ(e, t, z) − wΦ(e, t, ∅)``; 0 skips the unconditional pass.
        num_noise_samples: noise draws averaged per image.
        text_scheduler: the text-query sampler, ``"ddim"`` or ``"dpm++"``.
        classifier: ``"text_query"`` (the discrimination stream) or ``"diffusion_classifier"`` (a model whose text
            stream was not trained: the class prompt under which the image denoises best).
        method: the training method that produced the model (a record; :func:`diffdis.eval.api.applicable` reads it).
        generates: whether that method trained generation (FID and prompt adherence apply).
        resolution: the image side the model was trained at (None: the UNet's sample size times the VAE factor).
        image_dropout: the share of training pairs whose image was replaced by the unconditional input (the training's
            ``loss.p_uncond``); 0 means the image-free branch Φ(e, t, ∅) was never trained, and guidance w ≠ 0 is
            refused. Folders saved before this was recorded were trained with 0.1.
    """

    config_name = INDEX_NAME
    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: ModelMixin,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: SchedulerMixin,
        vae: Optional[ModelMixin] = None,
        text_scale: float = 1.0,
        num_inference_steps: int = 10,
        guidance_scale: float = 0.0,
        num_noise_samples: int = 1,
        text_scheduler: str = "ddim",
        classifier: str = "text_query",
        method: str = "diffdis",
        generates: bool = True,
        resolution: Optional[int] = None,
        image_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        if text_scheduler not in TEXT_SCHEDULERS:
            raise ValueError(f"text_scheduler must be one of {TEXT_SCHEDULERS}, got {text_scheduler!r}")
        if text_scale <= 0 or num_inference_steps < 1 or num_noise_samples < 1:
            raise ValueError("text_scale must be > 0, num_inference_steps and num_noise_samples >= 1")
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)
        if resolution is None:
            size = unet.config.sample_size
            resolution = int(size if isinstance(size, int) else size[0]) * vae_scale_factor(vae)
        self.register_to_config(
            text_scale=float(text_scale), num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
            num_noise_samples=int(num_noise_samples), text_scheduler=text_scheduler, classifier=classifier, method=method,
            generates=bool(generates), resolution=int(resolution), image_dropout=float(image_dropout),
        )

    # ------------------------------------------------------------------ what the model offers
    @property
    def resolution(self) -> int:
        """Image side (pixels) the model expects."""
        return int(self.config.resolution)

    @property
    def discriminates(self) -> bool:
        """Whether image and text features apply (text-query zero-shot and retrieval)."""
        return self.config.classifier == "text_query"

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text queries (N, d_e) of ``texts`` (float32)."""
        texts = list(texts)
        if not texts:
            raise ValueError("need at least one text")
        device = self.text_encoder.device
        out = [encode_text(self.text_encoder, tokenize(self.tokenizer, texts[i : i + batch_size], device))[1]
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out).float()  # (N, d_e)

    @torch.no_grad()
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        generator: GeneratorArg = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        num_noise_samples: Optional[int] = None,
        text_scheduler: Optional[str] = None,
    ) -> torch.Tensor:
        """Normalised image-side text queries (B, d_e) generated by the discrimination stream.

        Args:
            pixel_values: (B, 3, R, R) in [-1, 1] at :attr:`resolution`.
            generator: one generator, or one per image (then features do not depend on batching).
            num_inference_steps, guidance_scale, num_noise_samples, text_scheduler: override the config's K, w, n
                and sampler for this call.
        """
        if not self.discriminates:
            raise ZeroShotModelError(f"this model's text stream was not trained (method {self.config.method!r}): "
                                     "it has no image features; use the diffusion classifier")
        cfg = self.config
        sampler = TextQuerySampler(self.unet, self.scheduler.config, self._empty_context(), cfg.text_scale,
                                   text_scheduler or cfg.text_scheduler)
        latents = images_to_latents(pixel_values.to(self.unet.device), self.vae)  # (B, C, h, w)
        steps = num_inference_steps if num_inference_steps is not None else cfg.num_inference_steps
        guidance = guidance_scale if guidance_scale is not None else cfg.guidance_scale
        if guidance != 0 and not cfg.image_dropout:
            raise ZeroShotModelError(f"zero-shot guidance w={guidance:g} needs the image-free branch, which this model did not"
                                     " train (loss.p_uncond=0): use w=0, or train with loss.p_uncond > 0")
        noise = num_noise_samples if num_noise_samples is not None else cfg.num_noise_samples
        return sampler(latents, steps, guidance, noise, generator=generator)  # (B, d_e)

    @torch.no_grad()
    def diffusion_classifier_logits(self, pixel_values: torch.Tensor, prompts: Sequence[str], generator: GeneratorArg = None,
                                    num_timesteps: int = 10, keep: Optional[int] = None,
                                    first_timesteps: int = 2) -> torch.Tensor:
        """(B, K) logits of the diffusion classifier (Li et al. 2023) over one prompt per class; with ``keep``, only
        each image's ``keep`` best classes after ``first_timesteps`` timesteps are scored on the rest
        (:func:`~diffdis.pipelines.zeroshot.diffusion_classifier_logits`)."""
        contexts = class_contexts(self.text_encoder, self.tokenizer, list(prompts), "{}", self.unet.device)  # (K, L, d)
        latents = images_to_latents(pixel_values.to(self.unet.device), self.vae)
        noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
        return diffusion_classifier_logits(self.unet, latents, contexts, noise_scheduler, num_timesteps, generator,
                                           keep=keep, first_timesteps=first_timesteps)

    def _empty_context(self) -> torch.Tensor:
        """Context (1, L, d) of the empty prompt: the discrimination pass's text condition."""
        with torch.no_grad():
            context, _ = encode_text(self.text_encoder, tokenize(self.tokenizer, [""], self.text_encoder.device))
        return context.to(device=self.unet.device, dtype=self.unet.dtype)

    def preprocess(self, images: Union[torch.Tensor, Image.Image, Sequence[Image.Image]]) -> torch.Tensor:
        """PIL images (resized to :attr:`resolution`, RGB) or a (B, 3, R, R) tensor in [-1, 1] -> pixel values."""
        return images if isinstance(images, torch.Tensor) else pil_to_pixels(images, self.resolution)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        images: Union[torch.Tensor, Image.Image, Sequence[Image.Image]],
        texts: Sequence[str],
        generator: GeneratorArg = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        num_timesteps: int = 10,
    ) -> ZeroShotPipelineOutput:
        """Score every image against every text (class prompts for classification, captions for retrieval).

        Args:
            images: PIL images, or pixel values (B, 3, R, R) in [-1, 1].
            texts: the candidate texts.
            generator: one generator, or one per image.
            num_inference_steps, guidance_scale: override K and w (text queries).
            num_timesteps: timesteps per class of the diffusion classifier.
        """
        pixels = self.preprocess(images)
        if not self.discriminates:
            logits = self.diffusion_classifier_logits(pixels, texts, generator, num_timesteps)
            return ZeroShotPipelineOutput(logits_per_image=logits, image_embeds=None, text_embeds=None)
        image_embeds = self.encode_images(pixels, generator, num_inference_steps, guidance_scale)  # (B, d)
        text_embeds = self.encode_text(texts).to(image_embeds.device)  # (N, d)
        return ZeroShotPipelineOutput(image_embeds @ text_embeds.T, image_embeds, text_embeds)

    # ------------------------------------------------------------------ saving
    def save_index(self, folder: Union[str, os.PathLike]) -> None:
        """Write only this pipeline's index into a folder that already holds its components (a saved
        ``DiffDisPipeline`` of the same modules), so the weights are stored once."""
        self.save_config(folder)


def pil_to_pixels(images: Union[Image.Image, Sequence[Image.Image]], side: int) -> torch.Tensor:
    """PIL images -> pixel values (B, 3, side, side) in [-1, 1] (RGB, bicubic resize)."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(im.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, R, R) in [0, 255]
    return pixels / 127.5 - 1.0


def _pipeline_classes() -> dict:
    from .clip_pipeline import ClipZeroShotPipeline
    from .oner_pipeline import OneRZeroShotPipeline

    return {cls.__name__: cls for cls in (DiffDisZeroShotPipeline, ClipZeroShotPipeline, OneRZeroShotPipeline)}


def load_zero_shot_pipeline(folder: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                            dtype: torch.dtype = torch.float32):
    """Load the zero-shot pipeline of a model folder (the class its ``zeroshot_index.json`` names: the DiffDis
    pipeline, the CLIP one of ``method=clip`` or the OneR one of ``method=oner``), in eval mode on ``device``.

    Raises:
        ZeroShotModelError: the folder is not a model folder, is a prior's (``method=prior``: nothing to classify with)
            or has no ``zeroshot_index.json``.
    """
    from .prior_pipeline import check_not_prior

    folder = Path(folder)
    index = read_zero_shot_index(folder)
    if not index:
        if not folder.is_dir():
            raise ZeroShotModelError(f"model folder '{folder}' does not exist")
        check_not_prior(folder)
        check_dual_stream_folder(folder)
        raise ZeroShotModelError(f"'{folder}' has no {INDEX_NAME}: it was written by a diffdis "
                                 "from before zero-shot pipelines were saved; train it again to write one")
    classes = _pipeline_classes()
    cls = classes.get(index.get("_class_name"))
    if cls is None:
        raise ZeroShotModelError(f"{folder / INDEX_NAME} names {index.get('_class_name')!r}, not one of {sorted(classes)}")
    if cls is DiffDisZeroShotPipeline:
        check_dual_stream_folder(folder)
    pipe = cls.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def read_zero_shot_index(folder: Union[str, os.PathLike]) -> dict:
    """The saved zero-shot config of a model folder (no weights loaded); {} when it has none."""
    path = Path(folder) / INDEX_NAME
    return json.loads(path.read_text()) if path.is_file() else {}
