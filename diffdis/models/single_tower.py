"""One transformer with shared weights for image patches and text tokens (the tower of ``method=oner``).

OneR (Kong et al., AAAI 2023) encodes an image and its caption with the same transformer into one
modality-agnostic space. :class:`SingleTowerModel` holds what is modality-specific only at the input (a patch
embedding and a token embedding, each with its own position embedding, plus a learned modality embedding added to
every token) and shares everything after it: the [CLS] token, the pre-norm transformer layers, the final norm and
the linear projection. The pooled output of either modality is its [CLS] token.

Where our reading fills gaps of the paper (not available offline): the [CLS] token is shared by both modalities
(the modality embedding tells them apart); the projection head is shared; padded text tokens are masked out of
attention by ``pad_token_id`` (a tokenizer that pads with its end token masks that token too); images are
resized to ``image_size`` and read in [-1, 1] without further normalisation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel

IMAGE, TEXT = 0, 1  # rows of the modality embedding


class SingleTowerConfig(PretrainedConfig):
    """Shape of a :class:`SingleTowerModel`.

    Args:
        vocab_size, max_text_length, pad_token_id: the tokenizer's vocabulary size, padded length and pad id.
        image_size, patch_size, num_channels: the image side (a multiple of ``patch_size``) and channels.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the shared transformer.
        projection_dim: width of the joint embedding space.
        logit_scale_init: initial log of the contrastive temperature's inverse (ln(1/0.07), as CLIP).
    """

    model_type = "diffdis_single_tower"

    def __init__(self, vocab_size: int = 256, max_text_length: int = 16, image_size: int = 16, patch_size: int = 4,
                 num_channels: int = 3, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                 intermediate_size: int = 256, projection_dim: int = 64, logit_scale_init: float = 2.6592,
                 layer_norm_eps: float = 1e-5, initializer_range: float = 0.02, pad_token_id: Optional[int] = 0, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.max_text_length = vocab_size, max_text_length
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.projection_dim, self.logit_scale_init = projection_dim, logit_scale_init
        self.layer_norm_eps, self.initializer_range = layer_norm_eps, initializer_range


class SingleTowerModel(PreTrainedModel):
    """Image and text embeddings from one shared transformer (see the module docstring).

    ``encode_image(pixel_values)`` and ``encode_text(input_ids)`` give the projected, unnormalised [CLS] features
    (B, projection_dim); ``logit_scale`` is the learnable log inverse temperature of the contrastive loss.
    """

    config_class = SingleTowerConfig
    base_model_prefix = "tower"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True

    def __init__(self, config: SingleTowerConfig):
        super().__init__(config)
        c, w = config, config.hidden_size
        num_patches = (c.image_size // c.patch_size) ** 2
        # modality-specific input embeddings
        self.patch_embedding = nn.Conv2d(c.num_channels, w, kernel_size=c.patch_size, stride=c.patch_size)
        self.image_position = nn.Parameter(torch.zeros(1, 1 + num_patches, w))
        self.token_embedding = nn.Embedding(c.vocab_size, w)
        self.text_position = nn.Parameter(torch.zeros(1, 1 + c.max_text_length, w))
        self.modality_embedding = nn.Embedding(2, w)
        # shared by both modalities
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(w, c.num_attention_heads, c.intermediate_size, dropout=0.0, activation="gelu",
                                       layer_norm_eps=c.layer_norm_eps, batch_first=True, norm_first=True)
            for _ in range(c.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(w, eps=c.layer_norm_eps)
        self.projection = nn.Linear(w, c.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SingleTowerModel):
            from transformers import initialization as init

            std = module.config.initializer_range
            init.normal_(module.cls_token, std=std)
            init.normal_(module.image_position, std=std)
            init.normal_(module.text_position, std=std)
            init.constant_(module.logit_scale, float(module.config.logit_scale_init))

    # ------------------------------------------------------------------ the shared tower
    def encode_tokens(self, tokens: torch.Tensor, position: torch.Tensor, modality: int,
                      padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens (B, L, w) of one modality -> projected [CLS] feature (B, projection_dim).

        ``position`` (1, 1 + L, w) is that modality's position embedding; ``padding`` (B, L) marks tokens to ignore.
        """
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)  # (B, 1 + L, w)
        x = x + position[:, : x.shape[1]] + self.modality_embedding.weight[modality]
        mask = None
        if padding is not None:
            mask = torch.cat([padding.new_zeros(b, 1), padding], dim=1)  # (B, 1 + L) bool: [CLS] is never masked
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, None, mask, use_reentrant=False)
            else:
                x = layer(x, src_key_padding_mask=mask)  # (B, 1 + L, w)
        return self.projection(self.final_norm(x[:, 0]))  # (B, projection_dim)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, R, R) in [-1, 1] (resized to ``image_size`` when R differs) -> (B, projection_dim)."""
        side = self.config.image_size
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
        patches = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, N, w), N = (side / patch_size)^2
        return self.encode_tokens(patches, self.image_position, IMAGE)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L), L <= ``max_text_length`` -> (B, projection_dim); pad tokens are not attended to."""
        input_ids = input_ids.to(self.device)
        if input_ids.shape[1] > self.config.max_text_length:
            raise ValueError(f"{input_ids.shape[1]} tokens, more than max_text_length={self.config.max_text_length}")
        pad = self.config.pad_token_id
        padding = input_ids == pad if pad is not None else None  # (B, L)
        return self.encode_tokens(self.token_embedding(input_ids), self.text_position, TEXT, padding)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor):
        """(image features (B, d), text features (B', d)), both unnormalised."""
        return self.encode_image(pixel_values), self.encode_text(input_ids)
