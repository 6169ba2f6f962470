"""The training step of DiffDis as one ``nn.Module`` (so DDP wraps it once, one forward per step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from diffusers import DDPMScheduler
from torch import nn

from ..losses import contrastive_loss, gather_with_grad, image_generation_loss, scale_gradient, total_loss
from ..models.components import encode_text
from ..models.dual_stream_unet import DualStreamUNet
from ..schedule import text_forward, text_x0_from_eps


@dataclass
class StepOptions:
    """Loss options the step needs (a plain copy of :class:`diffdis.config.LossConfig`)."""

    lambda_ita: float = 1.0
    min_snr_gamma: Optional[float] = 5.0
    noise_offset: float = 0.0
    text_scale: float = 1.0
    p_uncond: float = 0.1
    p_uncond_text: float = 0.1
    logit_scale_max: float = 100.0
    timestep_sampling: str = "uniform"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    ita_fraction: float = 1.0
    ita_every: int = 1
    ig_fraction: float = 1.0

    @classmethod
    def from_config(cls, loss_cfg) -> "StepOptions":
        return cls(**{k: getattr(loss_cfg, k) for k in cls.__dataclass_fields__})


def _rand(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device=like.device, dtype=like.dtype)


def _randint(high: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


def _share(n: int, fraction: float) -> int:
    """How many of a batch of ``n`` a pass with ``fraction`` of it takes (at least 2, for the contrastive loss)."""
    return min(n, max(2, round(n * fraction)))


def sample_timesteps(n: int, num_t: int, generator: torch.Generator, device, options: StepOptions) -> torch.Tensor:
    """Image-stream timesteps (n,): uniform, or logit-normal in t/T (SD3's density; mean > 0 favours noise)."""
    if options.timestep_sampling == "uniform":
        return _randint(num_t, n, generator, device)
    z = torch.randn((n,), generator=generator, device=generator.device) * options.timestep_std + options.timestep_mean
    return (torch.sigmoid(z) * num_t).long().clamp(max=num_t - 1).to(device)


class DiffDisModule(nn.Module):
    """The trainable modules and the DiffDis objective.

    ``forward(latents, input_ids, empty_ids, generator, gather=True, step=None)`` runs the generation pass (L_IG)
    on the batch's first ``ig_fraction`` share and, when ``lambda_ita > 0``, the discrimination pass (L_ITA) on its
    first ``ita_fraction`` share (with ``ita_every=k``, only when ``step`` is a multiple of k; ``None``: always),
    and returns a dict of named losses with the total under ``"loss"``. Image-stream timesteps come from
    :func:`sample_timesteps`. All randomness comes from ``generator`` so that a
    checkpoint that saves its state resumes exactly. ``gather=False`` contrasts within the local
    batch only (for evaluation passes that not every process takes part in).
    """

    def __init__(self, unet: DualStreamUNet, text_encoder: nn.Module, noise_scheduler: DDPMScheduler, options: StepOptions):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.options = options
        self.register_buffer("alphas_cumprod", noise_scheduler.alphas_cumprod.clone().float(), persistent=False)

    def forward(
        self,
        latents: torch.Tensor,
        input_ids: torch.Tensor,
        empty_ids: torch.Tensor,
        generator: torch.Generator,
        gather: bool = True,
        step: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        opt = self.options
        full = latents.shape[0]
        num_t = self.noise_scheduler.config.num_train_timesteps
        ctx_all, query_all = encode_text(self.text_encoder, torch.cat([input_ids, empty_ids]))
        ctx, query, ctx_empty = ctx_all[:full], query_all[:full], ctx_all[full:]  # (B, L, d), (B, d_e), (1, L, d)

        # generation stream (on the batch's first ig_fraction share): L_IG, with caption dropout for guidance
        b = _share(full, opt.ig_fraction)
        x0 = latents[:b]
        drop = _rand((b,), generator, latents) < opt.p_uncond_text
        ctx_gen = torch.where(drop[:, None, None], ctx_empty.expand(b, -1, -1), ctx[:b])
        noise = _randn(x0.shape, generator, latents)
        if opt.noise_offset:
            noise = noise + opt.noise_offset * _randn((b, latents.shape[1], 1, 1), generator, latents)
        t = sample_timesteps(b, num_t, generator, latents.device, opt)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)  # (B, C, H, W)
        pred_type = self.noise_scheduler.config.prediction_type
        target = self.noise_scheduler.get_velocity(x0, noise, t) if pred_type == "v_prediction" else noise
        pred = self.unet(noisy, t, ctx_gen).sample  # (B, C, H, W)
        loss_ig = image_generation_loss(pred, target, t, self.alphas_cumprod, pred_type, opt.min_snr_gamma)
        if opt.lambda_ita <= 0 or (step is not None and step % opt.ita_every):
            return total_loss(loss_ig, None, 0.0)

        # discrimination stream: denoise the text query conditioned on the clean image, L_ITA
        b = _share(full, opt.ita_fraction)  # the batch's first b pairs
        latents, query = latents[:b], query[:b]
        t_e = _randint(num_t, b, generator, latents.device)
        e_t = text_forward(query.detach(), _randn(query.shape, generator, query), t_e, self.alphas_cumprod, opt.text_scale)
        uncond = _rand((b,), generator, latents) < opt.p_uncond  # image-condition dropout
        image = torch.where(uncond[:, None, None, None], _randn(latents.shape, generator, latents), latents)
        t_img = torch.where(uncond, torch.full_like(t_e, num_t - 1), torch.zeros_like(t_e))
        pred_e = self.unet.forward_text(e_t, t_e, image, ctx_empty.expand(b, -1, -1), t_img)  # (B, d_e)
        if self.unet.config.text_prediction_type == "epsilon":
            pred_e = text_x0_from_eps(e_t, pred_e, t_e, self.alphas_cumprod, opt.text_scale)
        scale = self.unet.logit_scale.exp().clamp(max=opt.logit_scale_max)
        distributed = gather and torch.distributed.is_available() and torch.distributed.is_initialized()
        ita = contrastive_loss(pred_e, query, scale, gather=gather_with_grad if distributed else None)
        # each of the W processes has the whole batch's gradient for its own features and DDP averages the
        # gradients over processes: W x the gradient makes the average equal one process on the whole batch
        world = torch.distributed.get_world_size() if distributed else 1
        out = total_loss(loss_ig, scale_gradient(ita["loss"], world), opt.lambda_ita)
        out.update(acc_i2t=ita["acc_i2t"], acc_t2i=ita["acc_t2i"], logit_scale=scale.detach())
        return out
