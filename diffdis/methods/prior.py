"""method=prior: a small diffusion prior that generates a CLIP image embedding from a caption.

The text→image embedding generator of RLEG, made as DALL-E 2 makes its prior: a frozen, trained CLIP model
(``model.prior.clip``, the model folder of ``method=clip``, ``rleg`` or ``unidiff``) embeds each batch's images and
captions (unit norm, no gradient); the diffusion variable is ``s`` x the image embedding (``s`` =
``model.prior.embedding_scale``, default sqrt(d)), noised by a diffusers ``DDPMScheduler``, and the denoiser
(:class:`~diffdis.models.prior.DiffusionPrior`) predicts the clean one from the noisy one, the timestep and the caption
embedding (x0 prediction):

    L = E ||x0 − D(sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, t, c)||²

with the caption replaced by a learned null token with probability ``model.prior.p_uncond`` (classifier-free
guidance). The model folder is a :class:`~diffdis.pipelines.prior_pipeline.DiffusionPriorPipeline` (the prior, a DDIM
sampler, a copy of the CLIP model and its tokenizer); :func:`generate_image_embeddings` samples from it. A prior
neither classifies nor generates images, so nothing is scored during training and the evaluation tools refuse its
folder with one line.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..config import ConfigError
from ..models.prior import DiffusionPrior
from ..pipelines.clip_pipeline import ClipZeroShotPipeline
from ..pipelines.prior_pipeline import (
    DiffusionPriorPipeline,
    generate_image_embeddings,
    is_prior_folder,
    load_prior_pipeline,
)
from ..pipelines.zeroshot import ZeroShotModelError, make_text_scheduler
from ..pipelines.zeroshot_pipeline import load_zero_shot_pipeline
from .base import Method, register

__all__ = ["PriorMethod", "generate_image_embeddings", "load_clip", "load_prior"]

CLIP_METHODS = "method=clip, rleg or unidiff"  # the methods whose model folder is a CLIP model


def _freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        if module is not None:
            module.requires_grad_(False).eval()


def load_clip(cfg) -> ClipZeroShotPipeline:
    """The frozen CLIP model of ``model.prior.clip`` (a model folder holding a ``ClipZeroShotPipeline``)."""
    path = cfg.model.prior.clip
    if not path:
        raise ConfigError(f"method=prior needs model.prior.clip: a trained CLIP model folder (<output_dir>/model of {CLIP_METHODS})")
    if is_prior_folder(path):
        raise ConfigError(f"model.prior.clip '{path}' is a prior folder, not a CLIP model ({CLIP_METHODS})")
    try:
        pipe = load_zero_shot_pipeline(path)
    except (ZeroShotModelError, OSError, ValueError) as err:
        raise ConfigError(f"model.prior.clip: {str(err).splitlines()[0]}") from None
    if not isinstance(pipe, ClipZeroShotPipeline):
        raise ConfigError(f"model.prior.clip '{path}' holds a {type(pipe).__name__} (method {pipe.config.method!r}),"
                          f" not a CLIP model ({CLIP_METHODS})")
    if pipe.resolution != cfg.data.resolution:
        raise ConfigError(f"model.prior.clip was trained at {pipe.resolution} px, data.resolution is {cfg.data.resolution}")
    _freeze(pipe.clip)
    return pipe


def load_prior(path: Optional[str], resolution: int, key: str = "model.rleg.prior") -> DiffusionPriorPipeline:
    """The frozen prior of ``path`` (a ``method=prior`` model folder, given as the config key ``key``), checked against
    the run's ``data.resolution``."""
    if not path:
        raise ConfigError(f"{key} is not set: give a trained prior folder (<output_dir>/model of method=prior)")
    try:
        pipe = load_prior_pipeline(path)
    except (ZeroShotModelError, OSError, ValueError) as err:
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    projection = pipe.clip.config.projection_dim
    if pipe.embedding_dim != projection:
        raise ConfigError(f"{key}: the prior generates {pipe.embedding_dim}-d embeddings, its CLIP model embeds in {projection}")
    if pipe.resolution != resolution:
        raise ConfigError(f"{key}'s CLIP model was trained at {pipe.resolution} px, data.resolution is {resolution}")
    return pipe


@register("prior")
class PriorMethod(Method):
    """L = ||x0 − D(x_t, t, c)||² on the frozen CLIP model's embeddings (``loss``; ``cosine``: the mean cosine
    similarity of the predicted and true clean embeddings, over the batch's timesteps).

    ``forward(pixels, input_ids, empty_ids, generator, gather=True, step=None)`` takes pixel values in [-1, 1]
    (``input_space = "pixels"``) and the CLIP tokenizer's ids; noise, timesteps and caption dropout are drawn from
    ``generator``; ``empty_ids``, ``gather`` and ``step`` are unused (the loss is per example).
    """

    input_space = "pixels"

    def __init__(self, prior: DiffusionPrior, clip: ClipZeroShotPipeline, noise_scheduler: DDPMScheduler,
                 p_uncond: float = 0.1, steps: int = 25, guidance: float = 1.0):
        super().__init__()
        self.prior = prior
        self.__dict__["clip"] = clip  # frozen, not a submodule: neither trained, checkpointed nor averaged
        self.noise_scheduler = noise_scheduler
        self.p_uncond, self.steps, self.guidance = float(p_uncond), int(steps), float(guidance)
        self.options = None

    @classmethod
    def from_config(cls, cfg, components) -> "PriorMethod":
        p = cfg.model.prior
        if cfg.data.cache_dir:
            raise ConfigError("method=prior reads pixels: data.cache_dir (a latent cache) does not apply")
        if not 0.0 <= p.p_uncond < 1.0:
            raise ConfigError(f"model.prior.p_uncond={p.p_uncond} must be in [0, 1)")
        if p.steps < 1 or p.num_layers < 1 or p.hidden_size % p.num_attention_heads:
            raise ConfigError("model.prior.steps and num_layers must be >= 1, num_attention_heads must divide hidden_size")
        if p.embedding_scale is not None and p.embedding_scale <= 0:
            raise ConfigError(f"model.prior.embedding_scale={p.embedding_scale} must be > 0")
        clip = load_clip(cfg)
        _freeze(components.unet, components.vae, components.text_encoder)  # not part of this method
        components.tokenizer = clip.tokenizer  # the captions are read by the CLIP model's text tower
        prior = DiffusionPrior(embedding_dim=clip.clip.config.projection_dim, hidden_size=p.hidden_size,
                               num_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
                               intermediate_size=p.intermediate_size, embedding_scale=p.embedding_scale)
        scheduler = DDPMScheduler(num_train_timesteps=p.num_train_timesteps, beta_schedule=p.beta_schedule,
                                  prediction_type="sample", clip_sample=False)
        return cls(prior, clip, scheduler, p.p_uncond, p.steps, p.guidance)

    @classmethod
    def trains_generation(cls, loss) -> bool:
        return False

    @classmethod
    def trains_discrimination(cls, loss) -> bool:
        return False

    def loss_keys(self) -> List[str]:
        return ["loss", "cosine"]

    @torch.no_grad()
    def embeddings(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The frozen CLIP model's unit-norm image (B, d) and text (B, d) embeddings of a batch."""
        if self.clip.device != pixels.device:
            self.clip.to(pixels.device)
        image = self.clip.encode_images(pixels)  # (B, d)
        text = self.clip.clip.get_text_features(input_ids=input_ids.to(pixels.device)).pooler_output  # (B, d)
        return image, F.normalize(text.float(), dim=-1)

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor, generator: torch.Generator,
                gather: bool = True, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        pixels = latents  # (B, 3, R, R) in [-1, 1]: this method's input space is pixels
        image, text = self.embeddings(pixels, input_ids)  # (B, d), (B, d)
        x0 = image * self.prior.embedding_scale  # (B, d)
        b, device = x0.shape[0], generator.device
        noise = torch.randn(x0.shape, generator=generator, device=device).to(x0.device)  # (B, d)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
        drop = torch.rand(b, generator=generator, device=device) < self.p_uncond  # (B,)
        t, drop = t.to(x0.device), drop.to(x0.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)  # (B, d)
        pred = self.prior(noisy, t, text, drop_text=drop).sample.float()  # (B, d)
        loss = F.mse_loss(pred, x0)
        cosine = F.cosine_similarity(pred.detach(), x0, dim=-1).mean()
        return {"loss": loss, "cosine": cosine}

    # ------------------------------------------------------------------ training set-up
    def param_groups(self, cfg) -> List[dict]:
        return [{"params": [p for p in self.prior.parameters() if p.requires_grad], "lr": cfg.train.learning_rate}]

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        return {"prior": self.prior}

    def configure_speed(self, cfg) -> None:
        pass  # a few tokens per example: nothing to gain from xformers or checkpointing

    # ------------------------------------------------------------------ inference
    def text_to_image_pipeline(self, components, scheduler=None):
        raise ValueError("method=prior does not generate images: it generates CLIP image embeddings (prior_pipeline)")

    def zero_shot_pipeline(self, components, cfg):
        raise ValueError("method=prior does not classify images: it generates CLIP image embeddings (prior_pipeline)")

    def prior_pipeline(self) -> DiffusionPriorPipeline:
        """The live prior as a :class:`DiffusionPriorPipeline` (DDIM on the training noise schedule)."""
        c = self.clip.config
        sampler = make_text_scheduler(self.noise_scheduler.config, "ddim", prediction_type="sample")
        return DiffusionPriorPipeline(prior=self.prior, scheduler=sampler, clip=self.clip.clip, tokenizer=self.clip.tokenizer,
                                      resolution=c.resolution, image_mean=c.image_mean, image_std=c.image_std,
                                      num_inference_steps=self.steps, guidance_scale=self.guidance, method=self.name)

    def save_pretrained(self, folder, components, cfg) -> None:
        self.prior_pipeline().save_pretrained(folder)
