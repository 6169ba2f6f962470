"""RLEG: CLIP-style contrastive training with generated embeddings as extra positives.

RLEG (Zhao et al., "Vision-Language Representation Learning with Diffusion-based Embedding Generation") adds
embeddings made by diffusion-based generators to the contrastive batches. Our discrimination stream *is* an
image→text embedding generator, so ``method=rleg`` uses a trained diffdis model (``model.rleg.generator``, frozen) to
generate one text embedding per training image, and trains a CLIP model with

    L = ITC(image features, caption features) + weight · ITC(image features, generated embeddings)

Where our reading filled gaps (the paper's full text is not at hand): the generated embeddings are positives of a
second symmetric InfoNCE term (the batch's other generated embeddings are its negatives), not appended to the first
term's negatives; the generator's text tower and tokenizer start the CLIP text tower, so that generated and caption
embeddings begin in one space (the text tower then trains on); the text→image generator of the paper (a diffusion
prior over CLIP image embeddings) is not implemented yet.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..config import ConfigError
from ..losses import data_parallel_contrastive_loss
from ..pipelines.clip_pipeline import clip_vision_inputs
from ..pipelines.zeroshot import ZeroShotModelError
from ..pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline, load_zero_shot_pipeline
from .base import register
from .clip import ClipMethod, build_clip


def load_generator(cfg) -> DiffDisZeroShotPipeline:
    """The frozen image→text embedding generator of ``model.rleg.generator`` (a trained diffdis model folder)."""
    path = cfg.model.rleg.generator
    if not path:
        raise ConfigError("method=rleg needs model.rleg.generator: a trained diffdis model folder (<output_dir>/model)")
    try:
        pipe = load_zero_shot_pipeline(path)
    except (ZeroShotModelError, OSError, ValueError) as err:
        raise ConfigError(f"model.rleg.generator: {str(err).splitlines()[0]}") from None
    if not isinstance(pipe, DiffDisZeroShotPipeline) or not pipe.discriminates:
        raise ConfigError(f"model.rleg.generator '{path}' has no trained discrimination stream (method {pipe.config.method!r})")
    if pipe.resolution != cfg.data.resolution:
        raise ConfigError(f"model.rleg.generator was trained at {pipe.resolution} px, data.resolution is {cfg.data.resolution}")
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


@register("rleg")
class RlegMethod(ClipMethod):
    """:class:`ClipMethod` plus ``weight`` × ITC between images and the generator's embeddings of them (``loss_gen``).

    Generation draws its noise from a CPU generator seeded by the training generator, so a resumed run repeats it.
    """

    def __init__(self, clip, generator: DiffDisZeroShotPipeline, weight: float, steps: Optional[int], logit_scale_max: float):
        super().__init__(clip, logit_scale_max)
        self.__dict__["generator"] = generator  # frozen, not a submodule: neither trained, checkpointed nor averaged
        self.weight = float(weight)
        self.steps = steps

    @classmethod
    def from_config(cls, cfg, components) -> "RlegMethod":
        if cfg.data.cache_dir:
            raise ConfigError("method=rleg reads pixels: data.cache_dir (a latent cache) does not apply")
        if cfg.model.rleg.weight < 0:
            raise ConfigError("model.rleg.weight must be >= 0")
        generator = load_generator(cfg)
        for frozen in (components.unet, components.vae, components.text_encoder):
            if frozen is not None:
                frozen.requires_grad_(False)
        components.tokenizer = generator.tokenizer  # the text tower's vocabulary is the generator's
        clip = build_clip(cfg, generator.text_encoder)
        return cls(clip, generator, cfg.model.rleg.weight, cfg.model.rleg.steps, cfg.model.clip.logit_scale_max)

    def loss_keys(self) -> List[str]:
        return ["loss", "loss_itc", "loss_gen", "acc_i2t", "acc_t2i"]

    @torch.no_grad()
    def generated(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The generator's normalised text embeddings (B, d) of ``pixels`` (B, 3, R, R)."""
        if self.generator.device != pixels.device:
            self.generator.to(pixels.device)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        return self.generator.encode_images(pixels, torch.Generator().manual_seed(seed), num_inference_steps=self.steps)

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor, generator: torch.Generator,
                gather: bool = True, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        pixels = latents  # (B, 3, R, R) in [-1, 1]
        image = self.clip.get_image_features(pixel_values=clip_vision_inputs(self.clip, pixels)).pooler_output  # (B, d)
        text = self.clip.get_text_features(input_ids=input_ids).pooler_output  # (B, d)
        made = self.generated(pixels, generator).to(image.dtype)  # (B, d), no gradient
        scale = self.clip.logit_scale.exp().clamp(max=self.logit_scale_max)
        itc = data_parallel_contrastive_loss(image, text, scale, gather)
        gen = data_parallel_contrastive_loss(image, made, scale, gather)
        loss = itc["loss"] + self.weight * gen["loss"]
        return {"loss": loss, "loss_itc": itc["loss"].detach(), "loss_gen": gen["loss"].detach(), "acc_i2t": itc["acc_i2t"],
                "acc_t2i": itc["acc_t2i"], "logit_scale": scale.detach()}
