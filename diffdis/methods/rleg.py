"""RLEG: CLIP-style contrastive training with generated embeddings as extra positives.

RLEG (Zhao et al., "Vision-Language Representation Learning with Diffusion-based Embedding Generation") adds
embeddings made by diffusion-based generators to the contrastive batches, in both directions. ``method=rleg`` takes
either generator or both (at least one), each a trained model folder, frozen:

- ``model.rleg.generator``: a trained diffdis model, whose discrimination stream *is* an image→text embedding
  generator: it generates one text embedding per training image;
- ``model.rleg.prior``: a trained diffusion prior (``method=prior``), a text→image embedding generator over the CLIP
  image embeddings of the CLIP model it was trained on: it generates one image embedding per caption;

and trains a CLIP model with

    L = ITC(image features, caption features) + weight · ITC(image features, generated text embeddings)
        + prior_weight · ITC(generated image embeddings, caption features)

(each ITC the symmetric InfoNCE of ``losses.data_parallel_contrastive_loss``; logged as ``loss_itc``, ``loss_gen``
and ``loss_prior``).

Our reading (the paper's full text is not at hand; where it is silent, we decided): the generated embeddings are
positives of their own symmetric InfoNCE terms (the batch's other generated embeddings are their negatives), not
appended to the first term's negatives. A generated embedding must be compared with features of the same space, so
the generators' spaces start the trained CLIP model: with a prior, the trained CLIP model starts as a copy of the
prior's CLIP model (both towers, its logit scale and its tokenizer; ``model.clip`` is unused), i.e. the prior is
trained on the CLIP model rleg starts from, and generated image embeddings and caption features begin in one space
(the towers then train on, the prior stays frozen; such a run continues that CLIP model's training, so compare it
with a CLIP baseline of as many steps in all); without a prior, the generator's text tower and tokenizer start
the CLIP text tower (a fresh image tower beside it), so that generated and caption embeddings begin in one space.
With both, the generator's text embeddings must have the prior CLIP model's width (a ``ConfigError`` otherwise); they
share its space only when that CLIP model's text tower descends from the generator's (a prior trained on a
``method=rleg`` model of the same generator, say), which no check can verify. Generating costs the generators' K
sampling steps per batch (``model.rleg.steps``, default 1: the classification figures of the diffdis generator do not
depend on K, and rleg trained with K = 1 came within 0.021 of K = 10 on every figure but relation and one size
figure, over 3 seeds, at 3-4x the steps/s; ``model.rleg.prior_steps``).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch

from ..config import ConfigError
from ..losses import data_parallel_contrastive_loss
from ..pipelines.prior_pipeline import DiffusionPriorPipeline
from ..pipelines.zeroshot import ZeroShotModelError
from ..pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline, load_zero_shot_pipeline
from .base import register
from .clip import ClipMethod, build_clip
from .prior import load_prior


def load_generator(cfg) -> DiffDisZeroShotPipeline:
    """The frozen image→text embedding generator of ``model.rleg.generator`` (a trained diffdis model folder)."""
    path = cfg.model.rleg.generator
    if not path:
        raise ConfigError("model.rleg.generator is not set: give a trained diffdis model folder (<output_dir>/model)")
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
    """:class:`ClipMethod` plus ``weight`` × ITC between images and the generator's text embeddings of them
    (``loss_gen``) and ``prior_weight`` × ITC between the prior's image embeddings of the captions and the captions
    (``loss_prior``), each where its generator is given.

    Generation draws its noise from CPU generators seeded by the training generator, so a resumed run repeats it.
    """

    def __init__(self, clip, generator: Optional[DiffDisZeroShotPipeline], weight: float, steps: Optional[int],
                 logit_scale_max: float, prior: Optional[DiffusionPriorPipeline] = None, prior_weight: float = 0.5,
                 prior_steps: Optional[int] = None):
        super().__init__(clip, logit_scale_max)
        if generator is None and prior is None:
            raise ValueError("RLEG needs a generator, a prior or both")
        self.__dict__["generator"] = generator  # frozen, not submodules: neither trained, checkpointed nor averaged
        self.__dict__["prior"] = prior
        self.weight, self.prior_weight = float(weight), float(prior_weight)
        self.steps, self.prior_steps = steps, prior_steps

    @classmethod
    def from_config(cls, cfg, components) -> "RlegMethod":
        r = cfg.model.rleg
        cls.check_and_freeze_components(cfg, components)
        if not (r.generator or r.prior):
            raise ConfigError("method=rleg needs model.rleg.generator (a trained diffdis model folder) or model.rleg.prior"
                              " (a trained prior folder, method=prior), or both")
        if r.weight < 0 or r.prior_weight < 0:
            raise ConfigError("model.rleg.weight and model.rleg.prior_weight must be >= 0")
        generator = load_generator(cfg) if r.generator else None
        prior = load_prior(r.prior, cfg.data.resolution) if r.prior else None
        if prior is None:
            components.tokenizer = generator.tokenizer  # the text tower's vocabulary is the generator's
            clip = build_clip(cfg, generator.text_encoder)
        else:
            clip = start_from_prior(prior, generator)
            components.tokenizer = prior.tokenizer  # the captions are read as the prior's CLIP model reads them
        return cls(clip, generator, r.weight, r.steps, cfg.model.clip.logit_scale_max, prior, r.prior_weight, r.prior_steps)

    def loss_keys(self) -> List[str]:
        made = (["loss_gen"] if self.generator is not None else []) + (["loss_prior"] if self.prior is not None else [])
        return ["loss", "loss_itc", *made, "acc_i2t", "acc_t2i"]

    @torch.no_grad()
    def generated(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The generator's normalised text embeddings (B, d) of ``pixels`` (B, 3, R, R)."""
        if self.generator.device != pixels.device:
            self.generator.to(pixels.device)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        return self.generator.encode_images(pixels, torch.Generator().manual_seed(seed), num_inference_steps=self.steps)

    @torch.no_grad()
    def generated_images(self, input_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The prior's normalised image embeddings (B, d) of the captions ``input_ids`` (B, L)."""
        if self.prior.device != input_ids.device:
            self.prior.to(input_ids.device)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        return self.prior(input_ids=input_ids, num_inference_steps=self.prior_steps,
                          generator=torch.Generator().manual_seed(seed)).image_embeds

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor, generator: torch.Generator,
                gather: bool = True, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        pixels = latents  # (B, 3, R, R) in [-1, 1]
        image, text = self.features(pixels, input_ids)  # (B, d), (B, d)
        scale = self.logit_scale()
        itc = data_parallel_contrastive_loss(image, text, scale, gather)
        loss = itc["loss"]
        out = {"loss_itc": itc["loss"].detach(), "acc_i2t": itc["acc_i2t"], "acc_t2i": itc["acc_t2i"],
               "logit_scale": scale.detach()}
        if self.generator is not None:
            made = self.generated(pixels, generator).to(image.dtype)  # (B, d), no gradient
            gen = data_parallel_contrastive_loss(image, made, scale, gather)
            loss = loss + self.weight * gen["loss"]
            out["loss_gen"] = gen["loss"].detach()
        if self.prior is not None:
            made_images = self.generated_images(input_ids, generator).to(text.dtype)  # (B, d), no gradient
            prior_itc = data_parallel_contrastive_loss(made_images, text, scale, gather)
            loss = loss + self.prior_weight * prior_itc["loss"]
            out["loss_prior"] = prior_itc["loss"].detach()
        return {"loss": loss, **out}


def start_from_prior(prior: DiffusionPriorPipeline, generator: Optional[DiffDisZeroShotPipeline]):
    """A trainable copy of the prior's CLIP model (the space its embeddings live in), checked against the generator's
    embedding width and the pixel normalisation this method reads images with."""
    c = prior.config
    if list(c.image_mean) != [0.5] * 3 or list(c.image_std) != [0.5] * 3:
        raise ConfigError("model.rleg.prior's CLIP model normalises pixels with its own mean and std; method=rleg reads "
                          "pixels in [-1, 1] (a CLIP model trained here)")
    clip = copy.deepcopy(prior.clip).requires_grad_(True).train()
    width = clip.config.projection_dim
    if generator is not None and generator.unet.config.text_dim != width:
        raise ConfigError(f"model.rleg.generator generates {generator.unet.config.text_dim}-d text embeddings, "
                          f"model.rleg.prior's CLIP model embeds in {width} dimensions: they must be equal")
    return clip
