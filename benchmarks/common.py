"""What the benchmarks share: command-line errors, dtypes, prompts, the device and the preset components."""

from __future__ import annotations

import argparse
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPTS = ["a red circle", "a green square on the left", "a blue triangle", "a small yellow diamond"]


class CliError(Exception):
    """A bad input: reported as one line, exit status 2."""


def prompts(n: int) -> list:
    """``n`` prompts, cycling through :data:`PROMPTS`."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def pick_device(name: Optional[str]) -> torch.device:
    """``name`` (cpu, cuda, cuda:1, ...) or, without one, CUDA when available."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise CliError("--device cuda given but CUDA is not available")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_model_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The options of the benchmarks that run a model folder or a preset with random weights."""
    p.add_argument("--model", default=None, help="a trained model folder (default: build --preset with random weights)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "sd15"),
                   help="architecture when no --model: tiny (configs/tiny.yaml) or sd15 (SD-1.5-sized UNet,"
                   " VAE and CLIP-L text tower) (default: tiny)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="weights dtype (default: float32)")
    p.add_argument("--batch-size", type=int, default=8, help="images per call (default: 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help=f"JSON file (default: benchmark_{name}.json)")


def sd15_components(resolution: int):
    """SD-1.5-sized components with random weights: UNet (860 M), VAE (84 M), CLIP ViT-L/14 text tower."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffdis.data.embedded import make_embedded_dataset
    from diffdis.models import DualStreamUNet
    from diffdis.models.components import train_tokenizer

    captions = make_embedded_dataset("train", 300, resolution=8)["caption"]
    tokenizer = train_tokenizer(captions, vocab_size=256, model_max_length=77)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=resolution,
    )
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768)  # the defaults are SD-1.x's
    return tokenizer, text_encoder, DualStreamUNet.from_unet(unet, text_dim=768), vae


def build_tiny(cfg):
    """``Components`` of a tiny config with random weights (the tokenizer trained on 500 embedded captions)."""
    from diffdis.train.build import build_components, caption_corpus, load_split

    captions = list(caption_corpus(load_split(cfg.data, "train", num_samples=500)))
    return build_components(cfg, captions=captions)


def tiny_components():
    """The embedded default (configs/tiny.yaml) with random weights, its training noise scheduler, image size and
    VAE (the PatchAutoencoder of a patch model, else None)."""
    from diffdis.config import load_config

    cfg = load_config(None, [])
    c = build_tiny(cfg)
    return c.tokenizer, c.text_encoder, c.unet, c.noise_scheduler, cfg.data.resolution, c.vae
