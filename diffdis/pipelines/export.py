"""Export the generation stream to vanilla diffusers folders.

A DiffDis UNet's generation forward equals a plain ``UNet2DConditionModel``'s, so the image branch exports
as one (``export_unet``) and, with a VAE, the whole model as a ``StableDiffusionPipeline`` folder that
loads without diffdis installed (``export_stable_diffusion``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedModel

from ..models.patch_autoencoder import is_patch_autoencoder
from .text_to_image import DiffDisPipeline

logger = logging.getLogger("diffdis.pipelines")

PathLike = Union[str, Path]


def to_plain_unet(unet_like: ModelMixin) -> UNet2DConditionModel:
    """The generation branch as a ``UNet2DConditionModel`` (``to_unet2d()`` when the model has it)."""
    unet = unet_like.to_unet2d() if hasattr(unet_like, "to_unet2d") else unet_like
    if type(unet) is not UNet2DConditionModel:
        raise TypeError(
            f"cannot export {type(unet_like).__name__}: expected a UNet2DConditionModel or a model with"
            " to_unet2d() returning one"
        )
    return unet


def export_unet(unet_like: ModelMixin, out_dir: PathLike) -> Path:
    """Write the generation branch as a plain ``UNet2DConditionModel`` folder (config.json + safetensors)."""
    out = Path(out_dir)
    to_plain_unet(unet_like).save_pretrained(out)
    return out


def to_plain_text_encoder(text_encoder: PreTrainedModel) -> CLIPTextModel:
    """A ``CLIPTextModel`` with the same text tower.

    ``StableDiffusionPipeline`` takes element 0 of the encoder output as the context, which for
    ``CLIPTextModelWithProjection`` is ``text_embeds``, not ``last_hidden_state``; so the projection is dropped.
    """
    if isinstance(text_encoder, CLIPTextModel):
        return text_encoder
    if isinstance(text_encoder, CLIPTextModelWithProjection):
        plain = CLIPTextModel(text_encoder.config).to(dtype=text_encoder.dtype)
        # transformers 5 dropped the `text_model` wrapper from CLIPTextModel (4.x had it).
        target = getattr(plain, "text_model", plain)
        target.load_state_dict(text_encoder.text_model.state_dict())
        return plain.eval()
    raise TypeError(f"cannot export text encoder {type(text_encoder).__name__}: expected a CLIP text model")


def to_stable_diffusion(pipe: DiffDisPipeline) -> StableDiffusionPipeline:
    """An in-memory ``StableDiffusionPipeline`` sharing ``pipe``'s weights (no safety checker)."""
    if pipe.vae is None:
        raise ValueError(
            "this is a pixel-space model (no VAE): StableDiffusionPipeline needs one; export the UNet only with"
            " export_unet()"
        )
    if is_patch_autoencoder(pipe.vae):
        raise ValueError(
            "this model folds pixel patches into channels (PatchAutoencoder), which StableDiffusionPipeline cannot"
            " load; export the UNet only with export_unet()"
        )
    # A copy: StableDiffusionPipeline rewrites `steps_offset` and `clip_sample` in the config it is given.
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sd = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=to_plain_text_encoder(pipe.text_encoder),
        tokenizer=pipe.tokenizer,
        unet=to_plain_unet(pipe.unet),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    changed = {k: v for k, v in sd.scheduler.config.items() if pipe.scheduler.config.get(k) != v}
    if changed:
        logger.warning(
            "StableDiffusionPipeline changed the scheduler settings %s, so its samples will differ from"
            " DiffDisPipeline's with the original scheduler",
            changed,
        )
    return sd


def export_stable_diffusion(pipe: DiffDisPipeline, out_dir: PathLike) -> Path:
    """Write a ``StableDiffusionPipeline`` folder (loads with plain diffusers, no diffdis import needed)."""
    out = Path(out_dir)
    to_stable_diffusion(pipe).save_pretrained(out)
    return out
