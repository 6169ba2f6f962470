"""DiffDis (the default method): L = L_IG + lambda * L_ITA on one dual-stream UNet, as one ``nn.Module`` (so DDP
wraps it once, one forward per step)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from diffusers import DDPMScheduler
from torch import nn

from ..config import LossConfig
from ..losses import data_parallel_contrastive_loss, image_generation_loss, total_loss
from ..models.components import encode_text
from ..models.dual_stream_unet import DualStreamUNet
from ..schedule import text_forward, text_x0_from_eps
from .base import Method, register


def _rand(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device=like.device, dtype=like.dtype)


def _randint(high: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


def _share(n: int, fraction: float) -> int:
    """How many of a batch of ``n`` a pass with ``fraction`` of it takes (at least 2, for the contrastive loss)."""
    return min(n, max(2, round(n * fraction)))


def sample_timesteps(n: int, num_t: int, generator: torch.Generator, device, options: LossConfig,
                     stream: str = "image") -> torch.Tensor:
    """Timesteps (n,) of the image stream (``loss.timestep_*``) or of the text query (``loss.text_timestep_*``):
    uniform, or logit-normal in t/T (SD3's density; mean > 0 favours noise)."""
    if stream not in ("image", "text"):
        raise ValueError(f"stream must be 'image' or 'text', got {stream!r}")
    prefix = "" if stream == "image" else "text_"
    if getattr(options, prefix + "timestep_sampling") == "uniform":
        return _randint(num_t, n, generator, device)
    mean, std = getattr(options, prefix + "timestep_mean"), getattr(options, prefix + "timestep_std")
    z = torch.randn((n,), generator=generator, device=generator.device) * std + mean
    return (torch.sigmoid(z) * num_t).long().clamp(max=num_t - 1).to(device)


@register("diffdis")
class DiffDisMethod(Method):
    """The trainable modules and the DiffDis objective.

    ``forward(latents, input_ids, empty_ids, generator, gather=True, step=None)`` runs the generation pass (L_IG)
    on the batch's first ``ig_fraction`` share and, when ``lambda_ita > 0``, the discrimination pass (L_ITA) on its
    first ``ita_fraction`` share (with ``ita_every=k``, only when ``step`` is a multiple of k; ``None``: always),
    and returns a dict of named losses with the total under ``"loss"``. Image-stream timesteps come from
    :func:`sample_timesteps`. All randomness comes from ``generator`` so that a
    checkpoint that saves its state resumes exactly. ``gather=False`` contrasts within the local
    batch only (for evaluation passes that not every process takes part in).

    Args:
        loss: the run's ``loss`` section (:class:`diffdis.config.LossConfig`), read as it is.
    """

    def __init__(self, unet: DualStreamUNet, text_encoder: nn.Module, noise_scheduler: DDPMScheduler, loss: LossConfig):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.options = loss
        self.register_buffer("alphas_cumprod", noise_scheduler.alphas_cumprod.clone().float(), persistent=False)

    @classmethod
    def from_config(cls, cfg, components) -> "DiffDisMethod":
        method = cls(components.unet, components.text_encoder, components.noise_scheduler, cfg.loss)
        with torch.no_grad():  # a checkpoint loaded later replaces it
            components.unet.logit_scale.fill_(math.log(cfg.loss.logit_scale_init))
        components.text_encoder.requires_grad_(bool(cfg.model.train_text_encoder))
        if components.vae is not None:
            components.vae.requires_grad_(False)
        if not method.discriminates:  # the text stream is not trained
            for p in components.unet.new_parameters():
                p.requires_grad_(False)
        return method

    @classmethod
    def find_unused_parameters(cls, cfg) -> bool:
        # the text stream in generation-only steps, or a frozen text encoder
        return cfg.loss.lambda_ita <= 0 or cfg.loss.ita_every > 1 or not cfg.model.train_text_encoder

    @classmethod
    def trains_discrimination(cls, loss) -> bool:
        return loss.lambda_ita > 0  # lambda = 0: generation only (the ablation's reference arm)

    def loss_keys(self) -> List[str]:
        return ["loss", "loss_ig"] + (["loss_ita", "acc_i2t", "acc_t2i"] if self.discriminates else [])

    def forward(
        self,
        latents: torch.Tensor,
        input_ids: torch.Tensor,
        empty_ids: torch.Tensor,
        generator: torch.Generator,
        gather: bool = True,
        step: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        full = latents.shape[0]
        ctx_all, query_all = encode_text(self.text_encoder, torch.cat([input_ids, empty_ids]))
        ctx, query, ctx_empty = ctx_all[:full], query_all[:full], ctx_all[full:]  # (B, L, d), (B, d_e), (1, L, d)
        loss_ig = self.generation_loss(latents, ctx, ctx_empty, generator)
        if not self.discriminates or (step is not None and step % self.options.ita_every):
            return total_loss(loss_ig, None, 0.0)
        ita = self.discrimination_loss(latents, query, ctx_empty, generator, gather)
        out = total_loss(loss_ig, ita.pop("loss"), self.options.lambda_ita)
        out.update(ita)
        return out

    def generation_loss(self, latents: torch.Tensor, ctx: torch.Tensor, ctx_empty: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        """L_IG on the batch's first ``ig_fraction`` share, with caption dropout for guidance."""
        opt = self.options
        b = _share(latents.shape[0], opt.ig_fraction)
        x0 = latents[:b]
        drop = _rand((b,), generator, latents) < opt.p_uncond_text
        ctx_gen = torch.where(drop[:, None, None], ctx_empty.expand(b, -1, -1), ctx[:b])
        noise = _randn(x0.shape, generator, latents)
        if opt.noise_offset:
            noise = noise + opt.noise_offset * _randn((b, latents.shape[1], 1, 1), generator, latents)
        t = sample_timesteps(b, self.noise_scheduler.config.num_train_timesteps, generator, latents.device, opt)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)  # (B, C, H, W)
        pred_type = self.noise_scheduler.config.prediction_type
        target = self.noise_scheduler.get_velocity(x0, noise, t) if pred_type == "v_prediction" else noise
        pred = self.unet(noisy, t, ctx_gen).sample  # (B, C, H, W)
        return image_generation_loss(pred, target, t, self.alphas_cumprod, pred_type, opt.min_snr_gamma)

    def discrimination_loss(self, latents: torch.Tensor, query: torch.Tensor, ctx_empty: torch.Tensor,
                            generator: torch.Generator, gather: bool = True) -> Dict[str, torch.Tensor]:
        """L_ITA on the batch's first ``ita_fraction`` pairs: denoise the text query conditioned on the clean image.

        With ``loss.ita_image_grad=False`` (``one_way`` fusion) the image side runs without gradient
        (:meth:`DualStreamUNet.encode_image`) and the text token is denoised against it
        (:meth:`DualStreamUNet.forward_text_cached`): the same prediction, but L_ITA reaches the UNet only through
        the text token's own projections.

        Returns ``loss`` (its gradient scaled by the number of processes, see below), ``acc_i2t``, ``acc_t2i`` and
        ``logit_scale``.
        """
        opt = self.options
        num_t = self.noise_scheduler.config.num_train_timesteps
        b = _share(latents.shape[0], opt.ita_fraction)
        latents, query = latents[:b], query[:b]
        t_e = sample_timesteps(b, num_t, generator, latents.device, opt, stream="text")
        e_t = text_forward(query.detach(), _randn(query.shape, generator, query), t_e, self.alphas_cumprod, opt.text_scale)
        uncond = _rand((b,), generator, latents) < opt.p_uncond  # image-condition dropout
        image = torch.where(uncond[:, None, None, None], _randn(latents.shape, generator, latents), latents)
        t_img = torch.where(uncond, torch.full_like(t_e, num_t - 1), torch.zeros_like(t_e))
        ctx = ctx_empty.expand(b, -1, -1)  # (B, L, d)
        if opt.ita_image_grad:
            pred_e = self.unet.forward_text(e_t, t_e, image, ctx, t_img)  # (B, d_e)
        else:  # one_way: the image side without gradient, then the text token against its keys/values
            pred_e = self.unet.forward_text_cached(e_t, t_e, self.unet.encode_image(image, ctx, t_img))  # (B, d_e)
        if self.unet.config.text_prediction_type == "epsilon":
            pred_e = text_x0_from_eps(e_t, pred_e, t_e, self.alphas_cumprod, opt.text_scale)
        scale = self.unet.logit_scale.exp().clamp(max=opt.logit_scale_max)
        ita = data_parallel_contrastive_loss(pred_e, query, scale, gather)
        return {"loss": ita["loss"], "acc_i2t": ita["acc_i2t"], "acc_t2i": ita["acc_t2i"],
                "logit_scale": scale.detach()}
