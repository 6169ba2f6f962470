"""Pure functions of the diffusion schedule shared by the image and text streams."""

from __future__ import annotations

import torch


def _gather(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(timesteps.device)[timesteps].float()
    return out.view(-1, *([1] * (ndim - 1)))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) per timestep: (B,) -> (B,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def text_forward(e0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """DiffDis's text forward process: e_t = gamma * sqrt(a_t) * e0 + sqrt(1 - a_t) * noise, (B, d) -> (B, d)."""
    a = _gather(alphas_cumprod, timesteps, e0.ndim)
    return gamma * a.sqrt() * e0 + (1.0 - a).sqrt() * noise


def text_x0_from_eps(e_t: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Invert :func:`text_forward` for e0 given a noise prediction."""
    a = _gather(alphas_cumprod, timesteps, e_t.ndim)
    return (e_t - (1.0 - a).sqrt() * eps) / (gamma * a.sqrt()).clamp(min=1e-8)


def text_eps_from_x0(e_t: torch.Tensor, e0: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """The noise implied by an e0 prediction (for DDIM-style stepping of the text query)."""
    a = _gather(alphas_cumprod, timesteps, e_t.ndim)
    return (e_t - gamma * a.sqrt() * e0) / (1.0 - a).sqrt().clamp(min=1e-8)
