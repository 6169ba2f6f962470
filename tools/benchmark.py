#!/usr/bin/env python
"""Speed benchmarks, each against its reference in the same process, written as JSON ratios.

    python tools/benchmark.py sample                      # tiny default, random weights
    python tools/benchmark.py sample --model outputs/tiny/model --batch-size 16 --steps 25
    python tools/benchmark.py sample --preset sd15 --device cuda --dtype bfloat16 --resolution 512
    python tools/benchmark.py zeroshot --model outputs/tiny/model --classes 10 1000
    python tools/benchmark.py train                        # tiny default: DiffDis step vs diffusers' step
    python tools/benchmark.py train model.patch_size=1 ... # any training-config override

``sample`` times DiffDisPipeline against a vanilla diffusers ``StableDiffusionPipeline`` holding the same
weights (same prompts, batch, steps, scheduler and seeds; the two alternate who runs first). A
pixel-space model has no VAE, which ``StableDiffusionPipeline`` requires, so both pipelines then get
the same stand-in ``AutoencoderKL`` (one level, 8 channels, spatial factor 1, random weights); its
cost is shared and is written into the JSON.

``zeroshot`` gives images/s of DiffDis zero-shot classification at each class count (the cost must be
nearly flat in the class count), joint vs one_way fusion with the image-feature cache, and the
diffusion-classifier baseline on the same model and images.

``train`` times one DiffDis training step (L_IG + L_ITA, AdamW) against the generation-only step of diffusers'
``train_text_to_image.py`` with the same UNet, text tower, noise scheduler, batch and optimiser settings (see
``diffdis.train.bench``); the ratio is what the second task costs per step.

Without ``--model`` the components are built from the preset with random weights: speed does not
depend on the weights. Timings are medians of ``--repeats`` rounds after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPTS = ["a red circle", "a green square on the left", "a blue triangle", "a small yellow diamond"]


class CliError(Exception):
    """A bad input: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface: one subcommand per benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("sample", "DiffDisPipeline vs StableDiffusionPipeline"),
                            ("zeroshot", "zero-shot images/s vs class count, fusion mode, diffusion classifier")):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--model", default=None, help="a trained model folder (default: build --preset with random weights)")
        s.add_argument("--preset", default="tiny", choices=("tiny", "sd15"),
                       help="architecture when no --model: tiny (configs/tiny.yaml) or sd15 (SD-1.5-sized UNet,"
                       " VAE and CLIP-L text tower) (default: tiny)")
        s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        s.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="weights dtype (default: float32)")
        s.add_argument("--batch-size", type=int, default=8, help="images per call (default: 8)")
        s.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (default: 3)")
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        s.add_argument("--out", default=None, help=f"JSON file (default: benchmark_{name}.json)")
    s = sub.choices["sample"]
    s.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    s.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default: 3)")
    s.add_argument("--scheduler", default="ddim", help="scheduler name (default: ddim)")
    s.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    s.add_argument("--xformers", action="store_true", help="use xformers attention in both pipelines (CUDA)")
    z = sub.choices["zeroshot"]
    z.add_argument("--steps", type=int, default=10, help="K text-query denoising steps (default: 10)")
    z.add_argument("--guidance", type=float, default=0.0, help="w on the image condition (default: 0)")
    z.add_argument("--classes", type=int, nargs="+", default=[10, 1000], help="class counts (default: 10 1000)")
    z.add_argument("--dc-timesteps", type=int, default=100,
                   help="diffusion classifier: timesteps per class, as Li et al. use at least (default: 100)")
    z.add_argument("--dc-images", type=int, default=2, help="diffusion classifier: images timed (default: 2)")
    t = sub.add_parser("train", help="a DiffDis training step vs the diffusers text-to-image step",
                       description="a DiffDis training step vs the diffusers text-to-image step (same UNet, batch, AdamW)")
    t.add_argument("--preset", default="tiny", choices=("tiny", "sd15"),
                   help="tiny: configs/tiny.yaml (with the overrides); sd15: an SD-1.5-sized UNet and CLIP-L text tower with"
                   " random weights, trained in latent space at --resolution / 8 with configs/sd15.yaml's loss (default: tiny)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="autocast dtype (default: float32, no autocast)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default: the config's train.batch_size)")
    t.add_argument("--resolution", type=int, default=512, help="sd15 preset: image size (default: 512)")
    t.add_argument("--steps-per-round", type=int, default=10, help="optimiser steps in each timed round (default: 10)")
    t.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (default: 3)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--out", default=None, help="JSON file (default: benchmark_train.json)")
    t.add_argument("overrides", nargs="*", help="key=value training-config overrides (the model, loss and batch)")
    return p


# ---------------------------------------------------------------------------- components
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


def stand_in_vae(channels: int):
    """A near-free ``AutoencoderKL`` with spatial factor 1, for pipelines that require a VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=8,
    ).eval()


def sampling_pipeline(args) -> Tuple[object, int, int, str]:
    """(DiffDisPipeline, the size both pipelines are called with, the model's image size, what the VAE is).

    With a stand-in VAE (factor 1) the pipelines are called at the latent size, so that the UNet does the same work
    as the model's own pipeline at its image size."""
    from diffusers import DDPMScheduler

    from diffdis.models.patch_autoencoder import is_patch_autoencoder
    from diffdis.pipelines import DiffDisPipeline, make_scheduler, vae_scale_factor

    if args.model:
        from diffdis.pipelines.zeroshot import check_dual_stream_folder

        check_dual_stream_folder(args.model)
        pipe = DiffDisPipeline.from_pretrained(args.model)
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    elif args.preset == "sd15":
        resolution = args.resolution or 512
        tokenizer, text_encoder, unet, vae = sd15_components(resolution)
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
        pipe = DiffDisPipeline(unet, text_encoder, tokenizer, make_scheduler(args.scheduler, sched.config), vae)
    else:
        tokenizer, text_encoder, unet, sched, _, vae = tiny_components()
        pipe = DiffDisPipeline(unet, text_encoder, tokenizer, make_scheduler(args.scheduler, sched.config), vae)
    vae_note = "the model's own"
    factor = vae_scale_factor(pipe.vae)
    image_size = args.resolution or pipe.unet.config.sample_size * factor
    if image_size % factor:
        raise CliError(f"--resolution {image_size} is not a multiple of the VAE factor {factor}")
    if pipe.vae is None or is_patch_autoencoder(pipe.vae):
        # StableDiffusionPipeline needs an AutoencoderKL: both pipelines get the same near-free one, so the UNet work
        # (the same latents) is what is compared
        was = "no VAE (pixel space)" if pipe.vae is None else "a PatchAutoencoder"
        pipe.register_modules(vae=stand_in_vae(pipe.unet.config.in_channels))
        vae_note = (f"the model has {was}; a stand-in AutoencoderKL (1 level, 8 channels, factor 1, random weights)"
                    " replaces it in both pipelines")
    return pipe, image_size // factor * vae_scale_factor(pipe.vae), image_size, vae_note


# ---------------------------------------------------------------------------- runs
def _device(args) -> torch.device:
    if args.device:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise CliError("--device cuda given but CUDA is not available")
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_sample(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds per call and the ratio ours / vanilla."""
    from diffdis.pipelines import benchmark_sample, to_stable_diffusion

    pipe, resolution, image_size, vae_note = sampling_pipeline(args)
    vanilla = to_stable_diffusion(pipe)
    for p in (pipe, vanilla):
        p.to(device) if dtype == torch.float32 else p.to(device=device, dtype=dtype)
        if args.xformers:
            p.enable_xformers_memory_efficient_attention()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    result = benchmark_sample(pipe, vanilla, prompts, args.steps, args.repeats, args.guidance, height=resolution)
    params = sum(p.numel() for p in pipe.unet.unet.parameters())
    result.update(resolution=resolution, image_size=image_size, guidance=args.guidance, scheduler=type(pipe.scheduler).__name__,
                  vae=vae_note, unet_generation_params=params, xformers=args.xformers,
                  reference="diffusers.StableDiffusionPipeline with the same UNet, text tower, VAE and scheduler")
    return result


def run_zeroshot(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Images/s of the DiffDis classifier and of the diffusion classifier on the same model and images."""
    from diffdis.eval.zeroshot import benchmark_zeroshot
    from diffdis.models.components import encode_text
    from diffdis.pipelines.zeroshot import images_to_latents, load_zero_shot_model, tokenize

    if args.preset == "sd15" and not args.model:
        raise CliError("zeroshot --preset sd15 is not supported without --model; use --model <folder>")
    vae = None
    if args.model:
        m = load_zero_shot_model(args.model, device)
        unet, text_encoder, tokenizer, sched_config, vae, resolution = (
            m.unet, m.text_encoder, m.tokenizer, m.scheduler_config, m.vae, m.resolution)
    else:
        tokenizer, text_encoder, unet, sched, resolution, vae = tiny_components()
        sched_config = dict(sched.config)
    cast = {"device": device} if dtype == torch.float32 else {"device": device, "dtype": dtype}
    unet, text_encoder = unet.to(**cast).eval(), text_encoder.to(**cast).eval()
    if vae is not None:
        vae = vae.to(**cast)
    from diffdis.data.embedded import make_embedded_dataset
    from diffdis.data.transforms import to_pixel_values

    images = make_embedded_dataset("test", args.batch_size, resolution=resolution)["image"]
    pixels = torch.stack([to_pixel_values(im.convert("RGB")) for im in images]).to(device=device, dtype=dtype)
    with torch.no_grad():
        latents = images_to_latents(pixels, vae)
        empty = encode_text(text_encoder, tokenize(tokenizer, [""], device))[0]
    result = benchmark_zeroshot(
        unet, sched_config, empty, latents, steps=args.steps, guidance=args.guidance, class_counts=tuple(args.classes),
        dc_classes=args.classes[0], dc_timesteps=args.dc_timesteps, dc_images=min(args.dc_images, args.batch_size),
        repeats=args.repeats,
    )
    result.update(resolution=resolution, images="embedded test split")
    return result


def run_train(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds per training step of DiffDis and of the diffusers text-to-image step, and their ratio."""
    from diffdis.config import load_config
    from diffdis.train.bench import benchmark_train
    from diffdis.train.build import Components, build_noise_scheduler

    cfg = load_config("sd15" if args.preset == "sd15" else None, args.overrides)  # a ConfigError is a ValueError
    batch = args.batch_size or cfg.train.batch_size
    if args.preset == "sd15":
        tokenizer, text_encoder, unet, vae = sd15_components(args.resolution)
        components = Components(tokenizer, text_encoder, unet, build_noise_scheduler(cfg), None)
        shape, image_size = (vae.config.latent_channels, args.resolution // 8, args.resolution // 8), args.resolution
    else:
        if cfg.model.pretrained:
            raise CliError("train --preset tiny builds its model from the config; model.pretrained is not used here")
        components = build_tiny(cfg)
        u = components.unet.config
        shape, image_size = (u.in_channels, u.sample_size, u.sample_size), cfg.data.resolution
    components.unet.to(device)
    components.text_encoder.to(device)
    latents = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0)).to(device)  # (B, C, h, w)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    tok = components.tokenizer
    ids = tok(prompts + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        result = benchmark_train(cfg, components, latents, ids[:-1], ids[-1:], args.steps_per_round, args.repeats)
    result.update(image_size=image_size, unet_generation_params=sum(p.numel() for p in components.unet.unet.parameters()),
                  preset=args.preset, overrides=list(args.overrides), lambda_ita=cfg.loss.lambda_ita,
                  ig_fraction=cfg.loss.ig_fraction, prediction_type=cfg.noise.prediction_type,
                  reference="the step of diffusers' train_text_to_image.py: generation only, the whole batch, same UNet,"
                  " text tower, noise scheduler and AdamW settings")
    return result


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or f"benchmark_{args.command}.json")
    try:
        steps = args.steps_per_round if args.command == "train" else args.steps
        if (args.batch_size is not None and args.batch_size < 1) or args.repeats < 1 or steps < 1:
            raise CliError("--batch-size, --repeats and --steps (--steps-per-round) must be at least 1")
        if getattr(args, "model", None) and not Path(args.model).is_dir():
            raise CliError(f"model folder '{args.model}' does not exist")
        if args.threads:
            torch.set_num_threads(args.threads)
        device, dtype = _device(args), DTYPES[args.dtype]
        if args.command == "sample" and args.xformers and device.type != "cuda":
            raise CliError("--xformers needs --device cuda")
        started = time.time()
        run = {"sample": run_sample, "zeroshot": run_zeroshot, "train": run_train}[args.command]
        result = run(args, device, dtype)
    except (CliError, ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    result.update(
        benchmark=args.command, model=getattr(args, "model", None) or f"{args.preset} preset, random weights",
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        dtype=args.dtype, torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
        batch_size=result.get("train_batch", args.batch_size), repeats=args.repeats, wall_s=time.time() - started,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    keys = {
        "sample": ("ratio", "ours_s", "vanilla_s"),
        "zeroshot": (*(f"diffdis_{n}_classes_img_s" for n in getattr(args, "classes", ())), "class_count_ratio",
                     "one_way_speedup", "diffusion_classifier_img_s", "diffusion_classifier_slowdown"),
        "train": ("ratio", "ours_step_s", "reference_step_s", "ours_img_s", "reference_img_s"),
    }[args.command]
    for k in keys:
        print(f"{k:>32}: {result[k]:.4g}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
