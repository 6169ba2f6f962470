"""A parameter-free, exact "autoencoder" that folds p x p pixel patches into channels (space-to-depth).

Diffusion in pixel space at a small resolution spends most of its compute on the full-resolution
level of the UNet. Folding each 2 x 2 patch into channels (as "simple diffusion" and DiT's patching
do) lets the UNet start at half the side with 4x the channels: the same images, the same loss, no
information lost, and the compute moves to levels where it buys a wider network. It speaks the
``AutoencoderKL`` interface (``encode(x).latent_dist``, ``decode(z).sample``, ``config.scaling_factor``),
so the trainer, the pipeline and the zero-shot code treat it as any VAE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """``pixel_unshuffle`` as the encoder and ``pixel_shuffle`` as the decoder: (B, C, H, W) <-> (B, C*p*p, H/p, W/p).

    Args:
        patch_size: side ``p`` of the folded patches (the pipeline's VAE scale factor).
        in_channels: image channels ``C``; the latents have ``C * p * p``.
        scaling_factor: latents are multiplied by it after encoding (1: the pixels' own [-1, 1] range).
    """

    @register_to_config
    def __init__(self, patch_size: int = 2, in_channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size={patch_size} must be at least 1")
        # No weights. This one-number buffer gives ModelMixin a device and a dtype to follow and a weights
        # file to save and load like any component's.
        self.register_buffer("patch", torch.tensor([float(patch_size)]))

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along each side."""
        return self.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.patch_size**2

    def _check(self, size: int, what: str) -> None:
        if size % self.config.patch_size:
            raise ValueError(f"{what} {size} is not a multiple of the patch size {self.config.patch_size}")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """(B, C, H, W) -> ``AutoencoderKLOutput`` whose deterministic ``latent_dist`` has mean (B, C*p*p, H/p, W/p)."""
        self._check(x.shape[-2], "image height")
        self._check(x.shape[-1], "image width")
        z = F.pixel_unshuffle(x, self.config.patch_size)  # (B, C*p*p, H/p, W/p)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """(B, C*p*p, h, w) -> ``DecoderOutput`` with ``sample`` (B, C, h*p, w*p)."""
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"latents have {z.shape[1]} channels; this patch autoencoder decodes {self.latent_channels}")
        x = F.pixel_shuffle(z, self.config.patch_size)  # (B, C, H, W)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Round trip, the identity: (B, C, H, W) -> (B, C, H, W)."""
        return self.decode(self.encode(x).latent_dist.mean).sample

    # The pipeline's VAE switches: one patch at a time is already what this does.
    def enable_slicing(self) -> None:  # noqa: D102
        pass

    def disable_slicing(self) -> None:  # noqa: D102
        pass

    def enable_tiling(self) -> None:  # noqa: D102
        pass

    def disable_tiling(self) -> None:  # noqa: D102
        pass


def is_patch_autoencoder(module: nn.Module | None) -> bool:
    """True for a :class:`PatchAutoencoder`."""
    return isinstance(module, PatchAutoencoder)
