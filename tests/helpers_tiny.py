"""Tiny, seeded components for fast tests (import read-only from any test).

Everything here builds in milliseconds on a CPU: a two-level ``UNet2DConditionModel``, a two-layer CLIP
text tower, a one-level ``AutoencoderKL`` and a word-level tokenizer. The tokenizer ids follow the
project convention: ``<pad>``=0, ``<unk>``=1, ``<mask>``=2 (unused), ``<bos>``=3, ``<eos>``=4; the eos id
must not be 2, or ``CLIPTextModel`` pools the wrong token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers resolves load methods here)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers import PreTrainedTokenizerFast

TINY_WORDS = (
    "a", "an", "the", "of", "red", "green", "blue", "yellow", "small", "large", "circle", "square",
    "triangle", "star", "photo", "on", "left", "right", "top", "bottom", "drawing", "cat", "dog",
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<bos>", "<eos>")
MAX_LENGTH = 16
CONTEXT_DIM = 32


class TinyCustomUNet(UNet2DConditionModel):
    """A trivial subclass that stands in for a custom UNet class (e.g. ``DualStreamUNet``) in round trips."""

    def to_unet2d(self) -> UNet2DConditionModel:
        """Return a plain ``UNet2DConditionModel`` with the same weights (what ``export_unet`` calls)."""
        plain = UNet2DConditionModel.from_config(self.config)
        plain.load_state_dict(self.state_dict())
        return plain


def tiny_tokenizer(words: Sequence[str] = TINY_WORDS, max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer; every encoding is ``<bos> words <eos>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 3), ("<eos>", 4)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def tiny_clip_tokenizer(folder: Path, words: Sequence[str] = TINY_WORDS, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` loaded from a vocab/merges pair written to ``folder``.

    Each word of ``words`` gets the BPE merges that build it, as in a real CLIP vocabulary (most encode as one
    token; a word can split where another word's merge ranks first); other words fall back to single characters.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in sorted({c for w in words for c in w}):  # single characters, so that unknown words still encode
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in words:  # "red": r + e -> re, re + d</w> -> red</w>
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        piece = symbols[0]
        for symbol in symbols[1:]:
            merge = f"{piece} {symbol}"
            if merge not in merges:
                merges.append(merge)
            piece += symbol
            vocab.setdefault(piece, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token="!")


def _text_config(tokenizer, hidden: int = CONTEXT_DIM) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_text_encoder(tokenizer, with_projection: bool = False, seed: int = 0) -> CLIPTextModel:
    """A 2-layer, 32-wide CLIP text tower whose special-token ids match ``tokenizer``."""
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_text_config(tokenizer)).eval()


def tiny_unet(
    in_channels: int = 3, sample_size: int = 8, seed: int = 0, cls: type = UNet2DConditionModel
) -> UNet2DConditionModel:
    """A two-level text-conditional UNet (32, 64 channels; attention only at the lower level)."""
    torch.manual_seed(seed)
    return cls(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A two-level ``AutoencoderKL`` (4 latent channels, spatial factor 2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def sd_like_scheduler() -> DDIMScheduler:
    """A DDIM scheduler with the Stable Diffusion settings (which ``StableDiffusionPipeline`` leaves alone)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_components(latent: bool = False, with_projection: bool = False, unet_cls: type = UNet2DConditionModel) -> dict:
    """Keyword arguments for ``DiffDisPipeline``: pixel space (8x8 images) or latent space (16x16 via the VAE)."""
    tokenizer = tiny_tokenizer()
    return {
        "unet": tiny_unet(in_channels=4 if latent else 3, sample_size=8, cls=unet_cls),
        "text_encoder": tiny_text_encoder(tokenizer, with_projection=with_projection),
        "tokenizer": tokenizer,
        "scheduler": sd_like_scheduler(),
        "vae": tiny_vae() if latent else None,
    }


def free_port() -> str:
    """A free local TCP port for a test's process group."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


SD_WORDS = TINY_WORDS + (
    "diamond", "cross", "ring", "magenta", "cyan", "picture", "image", "rendering", "shape", "coloured", "and", "with",
    "in", "at", "middle", "centre", "center", "big", "little", "is", "there", "one", "object", "background", "black",
    "white",
)


def save_tiny_stable_diffusion(folder: Path, seed: int = 0) -> Path:
    """Save a tiny Stable Diffusion 1.x folder (what ``model.pretrained`` points at) and return it.

    The layout is SD-1.x's: ``unet/`` (a ``UNet2DConditionModel`` on 4-channel latents), ``vae/`` (an
    ``AutoencoderKL``, factor 2), ``text_encoder/`` (a ``CLIPTextModel`` without projection, as SD-1.x's),
    ``tokenizer/`` (a ``CLIPTokenizer`` of more than 100 tokens) and ``scheduler/`` (SD's DDIM settings).
    """
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer(folder / "tokenizer", words=SD_WORDS)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(tokenizer, with_projection=False, seed=seed),
        tokenizer=tokenizer,
        unet=tiny_unet(in_channels=4, sample_size=8, seed=seed),
        scheduler=sd_like_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_zero_shot_model(folder: Path, seed: int = 0) -> Path:
    """A tiny zero-shot model folder (DiffDisZeroShotPipeline, 8x8 images, K=2) with every new weight perturbed."""
    from diffdis.models.dual_stream_unet import DualStreamUNet
    from diffdis.pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline
    from diffusers import DDPMScheduler

    tok = tiny_tokenizer()
    unet = DualStreamUNet.from_unet(tiny_unet(sample_size=8), text_dim=CONTEXT_DIM, fusion="one_way").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.new_parameters():  # FC_out starts at zero, which would make every feature the same
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    DiffDisZeroShotPipeline(unet=unet, text_encoder=tiny_text_encoder(tok, with_projection=True), tokenizer=tok,
                            scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False), text_scale=0.8,
                            num_inference_steps=2, resolution=8).save_pretrained(folder)
    return folder
