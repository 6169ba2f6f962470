"""Build what a run needs from its config: datasets, components, optimiser."""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

import torch
from diffusers import DDPMScheduler

from ..config import ConfigError
from ..data import ImageTextCollator, load_image_text_dataset
from ..models.components import (
    ComponentError,
    build_text_encoder,
    build_unet,
    load_scheduler_config,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    text_query_dim,
    train_tokenizer,
)
from ..models.dual_stream_unet import DualStreamUNet
from ..models.patch_autoencoder import PatchAutoencoder

MAX_TOKENIZER_CAPTIONS = 200_000


@dataclass
class Components:
    """Everything a DiffDis model is made of."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: DualStreamUNet
    noise_scheduler: DDPMScheduler
    vae: Optional[torch.nn.Module] = None


def load_split(data_cfg, split: str, streaming: Optional[bool] = None, num_samples: Optional[int] = None):
    """One split of the configured dataset, with columns "image" and "caption"."""
    return load_image_text_dataset(
        data_cfg.name,
        split=split,
        image_column=data_cfg.image_column,
        caption_column=data_cfg.caption_column,
        data_dir=data_cfg.data_dir,
        data_files=list(data_cfg.data_files) if data_cfg.data_files else None,
        streaming=data_cfg.streaming if streaming is None else streaming,
        resolution=data_cfg.resolution,
        seed=data_cfg.seed,
        num_samples=num_samples,
    )


def caption_corpus(dataset) -> Iterable[str]:
    """Captions to train a tokenizer on: every phrasing where a "captions" column exists."""
    column = "captions" if "captions" in (dataset.column_names or []) else "caption"
    for value in itertools.islice(iter(dataset.select_columns([column])), MAX_TOKENIZER_CAPTIONS):
        caps = value[column]
        yield from ([caps] if isinstance(caps, str) else [c for c in caps if isinstance(c, str)])


def build_noise_scheduler(cfg, base: Optional[dict] = None) -> DDPMScheduler:
    """The DDPM noise scheduler of training, from the config's ``noise`` section.

    Args:
        base: a pretrained checkpoint's scheduler config; its other settings (SD-1.x's ``steps_offset=1``, say)
            are kept, so that the saved model samples and exports as the checkpoint it was tuned from.
    """
    n = cfg.noise
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    settings = {k: v for k, v in (base or {}).items() if k in accepted}
    settings.update(
        num_train_timesteps=n.num_train_timesteps,
        beta_schedule=n.beta_schedule,
        beta_start=n.beta_start,
        beta_end=n.beta_end,
        prediction_type=n.prediction_type,
        trained_betas=None,
        clip_sample=False,
    )
    return DDPMScheduler(**settings)


def _unet_kwargs(cfg) -> dict:
    m = cfg.model
    return dict(fusion=m.fusion, post_mid_layers=m.post_mid_layers, text_prediction_type=m.text_prediction_type)


def build_components(cfg, captions: Optional[Iterable[str]] = None, tokenizer_dir: Optional[Path] = None) -> Components:
    """Load components from ``model.pretrained`` or build tiny ones (training a tokenizer on ``captions``).

    Args:
        captions: training captions (tiny models only).
        tokenizer_dir: a tokenizer saved by an earlier run of the same output folder; reused on resume.
    """
    m = cfg.model
    if m.pretrained:
        tokenizer = load_tokenizer(m.pretrained, m.revision)
        text_encoder = load_text_encoder(m.pretrained, m.revision)
        vae = load_vae(m.pretrained, m.revision) if m.use_vae else None
        base = load_unet(m.pretrained, m.revision)
        unet = DualStreamUNet.from_unet(base, text_dim=text_query_dim(text_encoder), **_unet_kwargs(cfg))
        scheduler = build_noise_scheduler(cfg, load_scheduler_config(m.pretrained, m.revision))
        return Components(tokenizer, text_encoder, unet, scheduler, vae)
    if m.use_vae:
        raise ConfigError("model.use_vae=true needs model.pretrained (a folder or hub id with a vae/ subfolder)")
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(str(tokenizer_dir), subfolder="")
    else:
        if captions is None:
            raise ComponentError("a tiny model needs the training captions to train its tokenizer")
        tokenizer = train_tokenizer(captions, m.text_encoder.vocab_size, m.text_encoder.max_length)
    text_encoder = build_text_encoder(m.text_encoder, tokenizer)
    unet_cfg, p = m.unet, m.patch_size
    channels, side = 3 * p * p, cfg.data.resolution // p
    if unet_cfg.in_channels != channels or unet_cfg.out_channels != channels:
        raise ConfigError(
            f"model.unet.in_channels and out_channels must be {channels} (3 x model.patch_size^2 = 3 x {p}^2),"
            f" got {unet_cfg.in_channels} and {unet_cfg.out_channels}"
        )
    if unet_cfg.sample_size != side:
        raise ConfigError(
            f"model.unet.sample_size={unet_cfg.sample_size} must be data.resolution / model.patch_size ="
            f" {cfg.data.resolution} / {p} = {side}"
        )
    base = build_unet(unet_cfg, cross_attention_dim=m.text_encoder.hidden_size)
    unet = DualStreamUNet.from_unet(base, text_dim=text_query_dim(text_encoder), **_unet_kwargs(cfg))
    vae = PatchAutoencoder(patch_size=p) if p > 1 else None
    return Components(tokenizer, text_encoder, unet, build_noise_scheduler(cfg), vae)


def make_collator(cfg, tokenizer, generator: Optional[torch.Generator] = None, defer_choice: bool = False) -> ImageTextCollator:
    d = cfg.data
    return ImageTextCollator(tokenizer, d.resolution, d.center_crop, d.random_flip, generator=generator, defer_choice=defer_choice)


def memory_cache_bytes(data_cfg, num_examples: int, deterministic: bool) -> int:
    """The ``cache_bytes`` of the training set's :class:`~diffdis.data.replacing.ReplacingDataset`: the budget of
    ``data.memory_cache_mb`` (per DataLoader worker) when every one of ``num_examples`` prepared images fits in it
    (3 x resolution² uint8 bytes and a little for its captions each) and the collator's output is the same every
    time (``deterministic``), else 0: a cache that holds only part of the data would cost memory and save little."""
    if not deterministic or data_cfg.memory_cache_mb <= 0:
        return 0
    budget = data_cfg.memory_cache_mb * 2**20 / max(1, data_cfg.num_workers)
    need = num_examples * (3 * data_cfg.resolution**2 + 512)
    return int(budget) if need <= budget else 0


# where torch's fused AdamW kernel runs (its documentation: floating-point parameters on these devices)
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")


def split_weight_decay(groups: List[dict]) -> List[dict]:
    """Each parameter group split in two: its parameters of two or more dimensions (weight matrices, convolution
    kernels, embeddings) as they are, and the rest (biases, norm scales, logit scales) with ``weight_decay`` 0, the
    exemption open_clip and timm make; empty groups left out, each keeping its other settings (``lr``)."""
    out = []
    for g in groups:
        for keep in (True, False):
            params = [p for p in g["params"] if (p.ndim >= 2) == keep]
            if params:
                out.append({**g, "params": params, **({} if keep else {"weight_decay": 0.0})})
    return out


def build_optimizer(cfg, method, device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """AdamW over the method's parameter groups (:meth:`diffdis.methods.Method.param_groups`).

    ``train.adam_fused`` None takes torch's fused kernel (the same update to float rounding, one kernel for all
    parameters: 2.9x faster than the default loop on CPU) when the parameters will train on a device of
    :data:`FUSED_ADAMW_DEVICES`, and torch's default otherwise; True asks for the fused kernel, False for the default.

    ``train.weight_decay_1d`` False exempts biases, norm scales and logit scales from weight decay
    (:func:`split_weight_decay`).

    Args:
        device: where the parameters will train (the trainer builds the optimiser before moving them); default:
            where they are now.
    """
    t = cfg.train
    groups = method.param_groups(cfg)
    if not t.weight_decay_1d:
        groups = split_weight_decay(groups)
    if device is None:
        device = next(p.device for g in groups for p in g["params"])
    fused = t.adam_fused if t.adam_fused is not None else torch.device(device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                             weight_decay=t.weight_decay, fused=fused or None)
