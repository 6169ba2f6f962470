"""Pure loss functions of DiffDis: L_IG (image generation), L_ITA (image-text alignment)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .schedule import snr


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an epsilon or v target: (B,) -> (B,)."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s.clamp(min=1e-8)


def image_generation_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    min_snr_gamma: Optional[float] = None,
) -> torch.Tensor:
    """L_IG: mean-squared error between prediction and target, optionally Min-SNR weighted.

    Args:
        model_pred, target: (B, C, H, W). timesteps: (B,).
    """
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
    if min_snr_gamma is None:
        return per_sample.mean()
    return (per_sample * min_snr_weights(alphas_cumprod, timesteps, min_snr_gamma, prediction_type)).mean()


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """L_ITA: symmetric InfoNCE between image-side and text-side features (normalised here).

    Args:
        image_features: (B, d) denoised text queries of the images. text_features: (B, d) clean text queries.
        logit_scale: the scale itself (already exponentiated and clamped), scalar.
        gather: optional all-gather that keeps the gradient of the local slice (open_clip's default): every
            process then computes the loss of the whole gathered batch, and its own features get exactly
            their share of the full-batch gradient. Data-parallel training averages gradients over the W
            processes, so the caller scales this loss's gradient by W (:func:`data_parallel_contrastive_loss`).

    Returns:
        ``{"loss", "acc_i2t", "acc_t2i"}`` over the whole (gathered) batch.
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    if gather is not None:
        img, txt = gather(img), gather(txt)
    logits = logit_scale * img @ txt.t()  # (N, N): rows images, columns texts
    labels = torch.arange(img.shape[0], device=img.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    return {
        "loss": loss,
        "acc_i2t": (logits.argmax(-1) == labels).float().mean().detach(),
        "acc_t2i": (logits.argmax(0) == labels).float().mean().detach(),
    }


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` with the same value and ``factor`` times its gradient."""
    return x if factor == 1 else x + (factor - 1) * (x - x.detach())


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along the batch keeping the gradient of the local slice (no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def total_loss(loss_ig: torch.Tensor, loss_ita: Optional[torch.Tensor], lambda_ita: float) -> Dict[str, torch.Tensor]:
    """L = L_IG + lambda * L_ITA as a dict of named terms with the total under ``"loss"``."""
    out = {"loss_ig": loss_ig, "loss": loss_ig}
    if loss_ita is not None and lambda_ita > 0:
        out["loss_ita"] = loss_ita
        out["loss"] = loss_ig + lambda_ita * loss_ita
    return out


def data_parallel_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                                   gather: bool = True) -> Dict[str, torch.Tensor]:
    """:func:`contrastive_loss` over the batch gathered from every process (when ``gather`` and a process group is
    up), its ``loss`` gradient scaled by the number of processes W: each process holds the whole batch's gradient
    for its own features and DDP averages over processes, so W x the gradient makes the average equal one process
    on the whole batch. The loss value is unchanged."""
    import torch.distributed as dist

    distributed = gather and dist.is_available() and dist.is_initialized()
    out = contrastive_loss(image_features, text_features, logit_scale, gather=gather_with_grad if distributed else None)
    out["loss"] = scale_gradient(out["loss"], dist.get_world_size() if distributed else 1)
    return out

