"""A small diffusion prior over CLIP image embeddings: the denoiser of ``method=prior``.

As DALL-E 2's prior (Ramesh et al. 2022), a transformer reads a short sequence of tokens, here
``[caption embedding, timestep, noisy image embedding, query]``, and the query token's output predicts the *clean*
image embedding (x0 prediction). The diffusion variable is the L2-normalised CLIP image embedding times
``embedding_scale`` (default sqrt(d), so that each coordinate has about the unit variance of the noise); the caption
condition is the normalised CLIP text embedding. A learned null token replaces the caption where the condition is
dropped (classifier-free guidance). The forward process, the sampler and the guidance live in
:class:`~diffdis.pipelines.prior_pipeline.DiffusionPriorPipeline` and the training method, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

TEXT, TIME, SAMPLE, QUERY = range(4)  # positions of the four tokens


@dataclass
class DiffusionPriorOutput(BaseOutput):
    """``sample`` (B, d): the predicted clean (scaled) image embedding."""

    sample: torch.Tensor


class DiffusionPrior(ModelMixin, ConfigMixin):
    """Predicts the clean scaled CLIP image embedding from a noisy one, its timestep and the caption's embedding.

    Args:
        embedding_dim: d, the CLIP projection width (image and text embeddings alike).
        hidden_size: width of the transformer (a multiple of ``num_attention_heads``).
        num_layers: pre-norm transformer encoder layers.
        num_attention_heads: attention heads per layer.
        intermediate_size: MLP width of each layer.
        embedding_scale: the diffusion variable is ``embedding_scale`` x the unit-norm image embedding
            (None: sqrt(embedding_dim)).
    """

    @register_to_config
    def __init__(self, embedding_dim: int = 64, hidden_size: int = 128, num_layers: int = 2, num_attention_heads: int = 4,
                 intermediate_size: int = 512, embedding_scale: Optional[float] = None):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_attention_heads={num_attention_heads}")
        self.text_in = nn.Linear(embedding_dim, hidden_size)
        self.null_text = nn.Parameter(torch.zeros(hidden_size))  # the dropped caption's token
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_in = TimestepEmbedding(hidden_size, hidden_size)
        self.sample_in = nn.Linear(embedding_dim, hidden_size)
        self.query = nn.Parameter(torch.zeros(hidden_size))
        self.positions = nn.Parameter(torch.zeros(4, hidden_size))
        layer = nn.TransformerEncoderLayer(hidden_size, num_attention_heads, intermediate_size, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(hidden_size)
        self.proj_out = nn.Linear(hidden_size, embedding_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Small random tokens; the output projection at zero, so a new prior predicts the mean embedding (0)."""
        for p in (self.null_text, self.query, self.positions):
            nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def embedding_scale(self) -> float:
        """Scale of the diffusion variable: ``embedding_scale`` x the unit-norm embedding."""
        scale = self.config.embedding_scale
        return float(scale) if scale is not None else math.sqrt(self.config.embedding_dim)

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, int], text_embeds: torch.Tensor,
                drop_text: Optional[torch.Tensor] = None, return_dict: bool = True):
        """Predict the clean scaled image embedding.

        Args:
            sample: the noisy scaled image embedding (B, d).
            timestep: (B,) or a scalar, in the training scheduler's steps.
            text_embeds: the caption's unit-norm CLIP text embedding (B, d).
            drop_text: (B,) bool, True where the caption is replaced by the null token (None: none is).
            return_dict: return a :class:`DiffusionPriorOutput` (else a one-tuple).
        """
        b = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)  # (B,)
        text = self.text_in(text_embeds.to(self.dtype) * self.embedding_scale)  # (B, H)
        if drop_text is not None:
            text = torch.where(drop_text.to(sample.device).view(b, 1), self.null_text.to(text.dtype), text)  # (B, H)
        time = self.time_in(self.time_proj(timestep).to(self.dtype))  # (B, H)
        noisy = self.sample_in(sample.to(self.dtype))  # (B, H)
        query = self.query.expand(b, -1)  # (B, H)
        tokens = torch.stack([text, time, noisy, query], dim=1) + self.positions  # (B, 4, H)
        hidden = self.encoder(tokens)  # (B, 4, H)
        out = self.proj_out(self.norm_out(hidden[:, QUERY]))  # (B, d)
        return DiffusionPriorOutput(sample=out) if return_dict else (out,)
