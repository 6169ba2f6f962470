"""Component builders: tokenizer, text encoder, VAE and UNet, pretrained or tiny.

Pretrained components load from a Stable Diffusion 1.x layout (``tokenizer/``, ``text_encoder/``,
``vae/``, ``unet/`` subfolders) given as a local folder or a hub id. Tiny components are built from
config, with a word-level tokenizer trained in-process on the training captions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel
from transformers import (
    AutoConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .patch_autoencoder import PatchAutoencoder

logger = logging.getLogger("diffdis.models")

SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<bos>", "<eos>")  # ids 0..4; eos must not be 2 for CLIP pooling
MIN_PRETRAINED_VOCAB = 100


class ComponentError(ValueError):
    """A component could not be loaded or is unusable (empty tokenizer, wrong architecture)."""


def train_tokenizer(captions: Iterable[str], vocab_size: int = 256, model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """Train a lower-cased word-level tokenizer on ``captions``.

    Special tokens are ``<pad>``=0, ``<unk>``=1, ``<mask>``=2 (unused), ``<bos>``=3, ``<eos>``=4:
    a CLIP text model with eos id 2 would pool the wrong token. Every encoding is
    ``<bos> words <eos>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(captions, trainer=trainer)
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ComponentError("tokenizer trained on the captions is empty: are the captions empty?")
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        mask_token="<mask>",
        model_max_length=model_max_length,
    )


def build_text_encoder(cfg, tokenizer: PreTrainedTokenizerBase) -> CLIPTextModelWithProjection:
    """A tiny CLIP text tower with a projection (so its ``text_embeds`` are the text query)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.projection_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModelWithProjection(config)


def load_tokenizer(path: str, revision: Optional[str] = None, subfolder: str = "tokenizer") -> PreTrainedTokenizerBase:
    """Load a tokenizer and refuse one that loaded empty (offline hub ids do that silently)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as err:
        raise ComponentError(f"cannot load tokenizer from '{path}' (subfolder '{subfolder}'): {err}") from None
    if len(tokenizer) < MIN_PRETRAINED_VOCAB and not _is_diffdis_tokenizer(tokenizer):
        raise ComponentError(
            f"tokenizer from '{path}' loaded with only {len(tokenizer)} tokens: the files are missing or "
            "the hub is unreachable (HF_HUB_OFFLINE=1?)"
        )
    return tokenizer


def _is_diffdis_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in SPECIAL_TOKENS) and len(vocab) > len(SPECIAL_TOKENS)


def load_text_encoder(path: str, revision: Optional[str] = None, subfolder: str = "text_encoder") -> CLIPTextModel:
    """Load a CLIP text encoder, with its projection only where the checkpoint has one."""
    try:
        config = AutoConfig.from_pretrained(path, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as err:
        raise ComponentError(f"cannot load text encoder from '{path}' (subfolder '{subfolder}'): {err}") from None
    with_projection = "CLIPTextModelWithProjection" in (config.architectures or [])
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls.from_pretrained(path, subfolder=subfolder, revision=revision)
    if not with_projection:
        logger.info("text encoder has no projection: the text query is the pooled output")
    return model


def text_query_dim(text_encoder) -> int:
    """d_e: the projection width where the encoder has one, else its hidden size."""
    if isinstance(text_encoder, CLIPTextModelWithProjection):
        return text_encoder.config.projection_dim
    return text_encoder.config.hidden_size


def encode_text(text_encoder, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token states for cross-attention and the normalised text query.

    Returns:
        context: (B, L, d_ctx) ``last_hidden_state``; query: (B, d_e), L2-normalised.
    """
    out = text_encoder(input_ids=input_ids)
    context = out.last_hidden_state  # (B, L, d_ctx)
    pooled = out.text_embeds if isinstance(text_encoder, CLIPTextModelWithProjection) else out.pooler_output
    return context, F.normalize(pooled.float(), dim=-1)  # (B, d_e)


def encode_latents(vae: Optional[ModelMixin], pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> the scaled training latents (B, C, h, w) of a frozen ``vae`` (no gradient; a
    sample of a stochastic posterior drawn from ``generator``); the pixels themselves without a VAE."""
    if vae is None:
        return pixel_values  # pixel space
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
        z = dist.mode() if dist.deterministic else dist.sample(generator=generator)  # (B, C, h, w)
        return (z * vae.config.scaling_factor).float()


def load_vae(path: str, revision: Optional[str] = None) -> AutoencoderKL:
    """Load the SD VAE (``vae/`` subfolder)."""
    try:
        return AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision)
    except (OSError, ValueError) as err:
        raise ComponentError(f"cannot load VAE from '{path}': {err}") from None


def load_vae_folder(folder) -> ModelMixin:
    """Load a saved ``vae/`` folder of either class: an ``AutoencoderKL`` or a :class:`PatchAutoencoder`."""
    config = json.loads((Path(folder) / "config.json").read_text())
    cls = PatchAutoencoder if config.get("_class_name") == "PatchAutoencoder" else AutoencoderKL
    return cls.from_pretrained(folder)


def vae_scale_factor(vae: Optional[ModelMixin]) -> int:
    """Pixels per latent along each side: 1 in pixel space, ``p`` for a patch autoencoder, ``2 ** (levels - 1)``
    for an ``AutoencoderKL``."""
    if vae is None:
        return 1
    if isinstance(vae, PatchAutoencoder):
        return vae.spatial_factor
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_scheduler_config(path: str, revision: Optional[str] = None) -> dict:
    """The ``scheduler/`` config of a pretrained folder or hub id, or ``{}`` (logged) where it has none.

    Its inference settings (``steps_offset``, ``timestep_spacing``, ...) are what the pipelines built from the
    checkpoint sample with; :func:`diffdis.train.build.build_noise_scheduler` keeps them in the saved model.
    """
    from diffusers import DDPMScheduler

    try:
        return dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))
    except (OSError, ValueError) as err:
        logger.warning("no scheduler config in '%s' (%s): the noise section of the config alone sets the scheduler", path, err)
        return {}


def load_unet(path: str, revision: Optional[str] = None) -> UNet2DConditionModel:
    """Load a plain diffusers UNet (``unet/`` subfolder)."""
    try:
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision)
    except (OSError, ValueError) as err:
        raise ComponentError(f"cannot load UNet from '{path}': {err}") from None


def build_unet(cfg, cross_attention_dim: int) -> UNet2DConditionModel:
    """A tiny ``UNet2DConditionModel`` from :class:`diffdis.config.UNetConfig`."""
    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        mid_block_type=cfg.mid_block_type,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type=cfg.addition_embed_type,
        addition_embed_type_num_heads=cfg.addition_embed_type_num_heads,
    )
