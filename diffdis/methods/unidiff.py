"""UniDiff: a CLIP model and a text-conditional diffusion UNet trained together with three losses.

UniDiff ("Advancing Vision-Language Models with Generative and Discriminative Learning") fine-tunes CLIP and a
text-to-image UNet jointly, changing neither architecture:

- **ITC**, image-text contrastive: symmetric InfoNCE with CLIP's learnable temperature between CLIP's image and text
  features (as ``method=clip``);
- **IS**, image synthesis: the text-to-image diffusion loss of the UNet conditioned on the CLIP text tower's token
  states (``last_hidden_state``); this is :meth:`DiffDisMethod.generation_loss` (min-SNR, timestep sampling, caption
  dropout, ``loss.ig_fraction``, all read from the ``loss`` section);
- **RSC**, reciprocal semantic consistency between CLIP's image features and the UNet's features of the same image.

L = ``unidiff.weight_itc`` * ITC + ``unidiff.weight_is`` * IS + ``unidiff.weight_rsc`` * RSC; a weight of 0 skips its
loss (no gradient). Zero-shot classification and retrieval go through CLIP, generation through the UNet.

Where the paper's description left a gap, this module reads it as follows:

- *UNet features*: the mid-block output of the IS pass itself (the noisy latents at the sampled timestep, conditioned
  on the possibly dropped caption), mean-pooled over space; no extra UNet pass. RSC therefore sees the same share of
  the batch as IS (``loss.ig_fraction``).
- *Projection*: a learnable linear map (:class:`RscProjection`) from the pooled UNet features to CLIP's joint space,
  with its own learnable temperature; it only serves training and is saved in checkpoints, not in the model folder.
- *Reciprocal*: a symmetric InfoNCE between the projected UNet features and the CLIP image features of the batch,
  UNet->CLIP (each UNet feature picks its image's CLIP feature) plus CLIP->UNet (the reverse), with no stop-gradient:
  it pulls the UNet, the projection and the CLIP vision tower towards each other.
- *Loss weights*: the abstract gives none; all three default to 1.

The UNet is the run's :class:`~diffdis.models.DualStreamUNet`, of which only the generation stream (a plain diffusers
UNet) is used: its text stream is frozen. The CLIP model is :func:`~diffdis.methods.clip.build_clip` of the run's text
encoder, so its text width is the UNet's ``cross_attention_dim``. The method reads pixels (``input_space = "pixels"``)
for CLIP and encodes the UNet's latents itself with the run's frozen VAE, where there is one.

The model folder holds both pipelines: the text-to-image ``DiffDisPipeline`` (``model_index.json``: the UNet, CLIP's
text tower and projection as a ``CLIPTextModelWithProjection``, tokenizer, scheduler, VAE) and the zero-shot
``ClipZeroShotPipeline`` (``zeroshot_index.json``, ``clip/``, with ``generates=True``), sharing ``tokenizer/``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from transformers import CLIPModel, CLIPTextModelWithProjection

from ..config import ConfigError
from ..losses import data_parallel_contrastive_loss
from ..models.components import encode_latents
from ..pipelines.clip_pipeline import ClipZeroShotPipeline, clip_vision_inputs
from .base import register
from .clip import build_clip
from .diffdis import DiffDisMethod


class RscProjection(ModelMixin, ConfigMixin):
    """RSC's map from pooled UNet mid-block features to CLIP's joint space, and its learnable temperature.

    Args:
        unet_dim: channels of the UNet's mid block. clip_dim: CLIP's ``projection_dim``.
        logit_scale_init: log of the initial inverse temperature (CLIP's ln(1/0.07)).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, unet_dim: int, clip_dim: int, logit_scale_init: float = 2.6592):
        super().__init__()
        self.proj = nn.Linear(unet_dim, clip_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def forward(self, mid: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) mid-block features -> (B, clip_dim) (not normalised)."""
        return self.proj(mid.float().mean(dim=(2, 3)))  # (B, C) -> (B, d)


@contextlib.contextmanager
def captured_output(module: nn.Module) -> Iterator[List[torch.Tensor]]:
    """Collect the outputs of ``module``'s forward calls inside the block (a list, filled as they run)."""
    outputs: List[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def clip_text_encoder(clip: CLIPModel) -> CLIPTextModelWithProjection:
    """A ``CLIPTextModelWithProjection`` that shares (not copies) ``clip``'s text tower and text projection: the text
    encoder of the text-to-image pipeline."""
    with torch.device("meta"):  # its own modules are replaced at once: allocate nothing
        encoder = CLIPTextModelWithProjection(clip.config.text_config)
    encoder.text_model = clip.text_model
    encoder.text_projection = clip.text_projection
    return encoder


@register("unidiff")
class UniDiffMethod(DiffDisMethod):
    """L = w_itc * ITC + w_is * IS + w_rsc * RSC over a CLIP model, the generation stream of the UNet and the RSC head.

    ``forward(pixels, input_ids, empty_ids, generator, gather=True, step=None)`` takes pixel values in [-1, 1]
    (``input_space = "pixels"``) and returns ``loss`` and each weighted-in term (``loss_itc``, ``loss_is``,
    ``loss_rsc``), with ITC's accuracies and both temperatures. Its randomness (IS noise, timesteps, caption dropout,
    a stochastic VAE's sample) comes from ``generator``; ``step`` is unused.
    """

    input_space = "pixels"
    zero_shot = "text_query"

    def __init__(self, clip: CLIPModel, unet, noise_scheduler, rsc_head: RscProjection, loss, weights,
                 logit_scale_max: float = 100.0, vae: Optional[nn.Module] = None):
        super().__init__(unet, None, noise_scheduler, loss)
        self.clip = clip
        self.rsc_head = rsc_head
        self.weights = weights
        self.logit_scale_max = logit_scale_max
        # frozen and not a submodule: none of its parameters in DDP, EMA or checkpoints (the trainer moves it)
        object.__setattr__(self, "vae", vae)

    @classmethod
    def from_config(cls, cfg, components) -> "UniDiffMethod":
        if cfg.data.cache_dir:
            raise ConfigError("method=unidiff reads pixels: data.cache_dir (a latent cache) does not apply")
        clip = build_clip(cfg, components.text_encoder)
        context_dim = components.unet.config.cross_attention_dim
        if context_dim != clip.config.text_config.hidden_size:
            raise ConfigError(f"method=unidiff: the UNet's cross_attention_dim={context_dim} must be the CLIP text "
                              f"width {clip.config.text_config.hidden_size}")
        for frozen in (components.vae, components.text_encoder):  # CLIP holds its own copy of the text tower
            if frozen is not None:
                frozen.requires_grad_(False)
        components.unet.requires_grad_(True)
        for p in components.unet.new_parameters():  # the text stream: UniDiff does not change the UNet's architecture
            p.requires_grad_(False)
        head = RscProjection(components.unet.config.block_out_channels[-1], clip.config.projection_dim,
                             cfg.model.clip.logit_scale_init)
        return cls(clip, components.unet, components.noise_scheduler, head, cfg.loss, cfg.unidiff,
                   cfg.model.clip.logit_scale_max, components.vae)

    @classmethod
    def find_unused_parameters(cls, cfg) -> bool:
        w = cfg.unidiff  # a loss weighted 0 is skipped: the modules only it trains get no gradient
        return min(w.weight_itc, w.weight_is, w.weight_rsc) <= 0

    @classmethod
    def trains_generation(cls, loss) -> bool:
        return True

    @classmethod
    def trains_discrimination(cls, loss) -> bool:
        return True

    def loss_keys(self) -> List[str]:
        w = self.weights
        return (["loss"] + (["loss_itc", "acc_i2t", "acc_t2i"] if w.weight_itc > 0 else [])
                + (["loss_is"] if w.weight_is > 0 else []) + (["loss_rsc"] if w.weight_rsc > 0 else []))

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor,
                generator: torch.Generator, gather: bool = True, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        pixels, w, full = latents, self.weights, latents.shape[0]  # (B, 3, R, R) in [-1, 1]: the input space is pixels
        text = self.clip.get_text_features(input_ids=torch.cat([input_ids, empty_ids]))
        out: Dict[str, torch.Tensor] = {}
        image = None
        if w.weight_itc > 0 or w.weight_rsc > 0:
            vision_inputs = clip_vision_inputs(self.clip, pixels)  # (B, 3, S, S) at the vision tower's size
            image = self.clip.get_image_features(pixel_values=vision_inputs).pooler_output  # (B, d)
        if w.weight_itc > 0:
            itc = self._contrast(image, text.pooler_output[:full], self.clip.logit_scale, gather)  # (B, d), (B, d)
            out.update(loss_itc=itc["loss"], acc_i2t=itc["acc_i2t"], acc_t2i=itc["acc_t2i"], logit_scale=itc["scale"])
        if w.weight_is > 0 or w.weight_rsc > 0:
            ctx = text.last_hidden_state  # (B + 1, L, d_ctx): the captions' token states, then the empty prompt's
            z0 = encode_latents(self.vae, pixels, generator)  # (B, C, h, w), no gradient (the VAE is frozen)
            with captured_output(self.unet.unet.mid_block) as mids:
                loss_is = self.generation_loss(z0, ctx[:full], ctx[full:], generator)  # on the first b of the batch
            if w.weight_is > 0:
                out["loss_is"] = loss_is
            if w.weight_rsc > 0:
                unet_features = self.rsc_head(mids[0])  # (b, C_mid, h', w') -> (b, d)
                rsc = self._contrast(unet_features, image[: unet_features.shape[0]], self.rsc_head.logit_scale, gather)
                out.update(loss_rsc=rsc["loss"], rsc_logit_scale=rsc["scale"])
        weighted = {"loss_itc": w.weight_itc, "loss_is": w.weight_is, "loss_rsc": w.weight_rsc}
        out["loss"] = sum(weight * out[key] for key, weight in weighted.items() if key in out)
        return out

    def _contrast(self, a: torch.Tensor, b: torch.Tensor, log_scale: torch.Tensor,
                  gather: bool) -> Dict[str, torch.Tensor]:
        """Symmetric InfoNCE of paired features (n, d), gathered across processes when ``gather``; its gradient scaled
        by the number of processes (:func:`~diffdis.losses.data_parallel_contrastive_loss`)."""
        scale = log_scale.exp().clamp(max=self.logit_scale_max)
        return {**data_parallel_contrastive_loss(a, b, scale, gather), "scale": scale.detach()}

    # ------------------------------------------------------------------ training set-up
    def param_groups(self, cfg) -> List[dict]:
        """The UNet's generation stream and the RSC head at ``train.learning_rate``, CLIP at
        ``train.learning_rate_text_encoder`` (unset: ``learning_rate``)."""
        t = cfg.train
        groups = [
            {"params": [p for p in list(self.unet.parameters()) + list(self.rsc_head.parameters()) if p.requires_grad],
             "lr": t.learning_rate},
            {"params": [p for p in self.clip.parameters() if p.requires_grad],
             "lr": t.learning_rate_text_encoder or t.learning_rate},
        ]
        return [g for g in groups if g["params"]]

    def checkpoint_modules(self) -> Dict[str, nn.Module]:
        return {"clip": self.clip, "unet": self.unet, "rsc_head": self.rsc_head}

    def configure_speed(self, cfg) -> None:
        if cfg.model.enable_xformers and torch.cuda.is_available():
            import importlib.util

            if importlib.util.find_spec("xformers") is not None:
                self.unet.unet.enable_xformers_memory_efficient_attention()
        if cfg.model.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.clip.gradient_checkpointing_enable()

    # ------------------------------------------------------------------ inference
    def text_to_image_pipeline(self, components, scheduler=None):
        """A ``DiffDisPipeline`` of the UNet conditioned on CLIP's text tower (shared, live)."""
        from ..pipelines import DiffDisPipeline

        return DiffDisPipeline(unet=self.unet, text_encoder=clip_text_encoder(self.clip),
                               tokenizer=components.tokenizer, scheduler=scheduler or components.noise_scheduler,
                               vae=components.vae)

    def zero_shot_pipeline(self, components, cfg) -> ClipZeroShotPipeline:
        return ClipZeroShotPipeline(clip=self.clip, tokenizer=components.tokenizer, resolution=cfg.data.resolution,
                                    method=self.name, generates=True)

    def save_pretrained(self, folder, components, cfg) -> None:
        """Both pipelines in one folder: ``model_index.json`` (text-to-image) and ``zeroshot_index.json`` (CLIP)."""
        self.text_to_image_pipeline(components).save_pretrained(folder)
        self.zero_shot_pipeline(components, cfg).save_pretrained(folder)
