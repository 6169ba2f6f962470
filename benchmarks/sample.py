"""Sampling speed: ``DiffDisPipeline`` against a vanilla diffusers ``StableDiffusionPipeline`` with the same weights.

Both get the same prompts, batch, steps, scheduler, guidance and seeds, and alternate who runs first. A
pixel-space model has no VAE, which ``StableDiffusionPipeline`` requires, so both pipelines then get the same
stand-in ``AutoencoderKL`` (one level, 8 channels, spatial factor 1, random weights); its cost is shared and is
written into the JSON.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import torch
from diffusers import DiffusionPipeline

from .common import CliError, add_model_arguments, prompts, sd15_components, tiny_components
from .sample_profile import profile_calls
from .timing import qualified_name, time_interleaved

HELP = "DiffDisPipeline vs StableDiffusionPipeline"


def summary_keys(args) -> Tuple[str, ...]:
    """The keys printed after a run."""
    return ("ratio", "ours_s", "vanilla_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``run.py sample``."""
    add_model_arguments(p, "sample")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default: 3)")
    p.add_argument("--scheduler", default="ddim", help="scheduler name (default: ddim)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--xformers", action="store_true", help="use xformers attention in both pipelines (CUDA)")
    p.add_argument("--profile", action="store_true",
                   help="after the timing, profile one call of each pipeline: operators' self time, syncs, casts,"
                   " kernel launches, and the operators that take more time in ours (benchmarks/sample_profile.py)")


class _UNetCalls:
    """Counts the UNet calls of one pipeline call and keeps the shape of the last UNet input."""

    def __init__(self, unet: torch.nn.Module):
        self.count, self.input_shape = 0, None
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1
        self.input_shape = list(args[0].shape)


def benchmark_sample(
    pipe_ours: DiffusionPipeline,
    pipe_vanilla: DiffusionPipeline,
    prompts: List[str],
    steps: int,
    repeats: int = 3,
    guidance_scale: float = 3.0,
    seed: int = 0,
    height: Optional[int] = None,
    profile: bool = False,
) -> dict:
    """Seconds per call of both pipelines on the same prompts, steps, guidance and seeds.

    One warm-up call each, then ``repeats`` rounds in which the two alternate who goes first. ``height`` sets the
    (square) image size of both; default: each pipeline's own. ``profile``: one more call of each under
    ``torch.profiler`` after the timing (:func:`benchmarks.sample_profile.profile_calls`), in ``result["profile"]``.

    Returns:
        medians ``ours_s`` and ``vanilla_s``, ``ratio = ours_s / vanilla_s`` (below 1: ours is faster), the
        per-round times, and what each arm did in its last call: its class, output shape, UNet calls and UNet
        input shape (``{arm}_pipeline``, ``{arm}_output_shape``, ``{arm}_unet_calls``, ``{arm}_unet_input_shape``).
    """
    device = pipe_ours._execution_device
    arms = {"ours": pipe_ours, "vanilla": pipe_vanilla}
    seen: Dict[str, dict] = {}

    def run(name: str, pipe: DiffusionPipeline) -> Callable[[], object]:
        unet_calls = _UNetCalls(pipe.unet)  # the vanilla UNet may be ours' inner one: count within each call only
        counters.append(unet_calls)

        def call() -> object:
            gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
            before = unet_calls.count
            images = pipe(
                prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="np",
                height=height, width=height,
            ).images  # (B, H, W, 3)
            seen[name] = {"output_shape": list(images.shape), "unet_calls": unet_calls.count - before,
                          "unet_input_shape": unet_calls.input_shape}
            return images

        return call

    counters: List[_UNetCalls] = []
    calls = {name: run(name, pipe) for name, pipe in arms.items()}
    for pipe in arms.values():
        pipe.set_progress_bar_config(disable=True)
    try:
        times = time_interleaved(calls, repeats, device)
        profiled = profile_calls(calls, device) if profile else None
    finally:
        for counter in counters:
            counter.handle.remove()
    ours, vanilla = statistics.median(times["ours"]), statistics.median(times["vanilla"])
    result = {
        "ours_s": ours,
        "vanilla_s": vanilla,
        "ratio": ours / vanilla,
        "ours_runs_s": times["ours"],
        "vanilla_runs_s": times["vanilla"],
        "steps": steps,
        "num_prompts": len(prompts),
    }
    if profiled:
        result["profile"] = profiled
    for name, pipe in arms.items():
        result[f"{name}_pipeline"] = qualified_name(pipe)
        result.update({f"{name}_{key}": value for key, value in seen[name].items()})
    return result


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


def run(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds per call and the ratio ours / vanilla."""
    from diffdis.pipelines import to_stable_diffusion

    if args.xformers and device.type != "cuda":
        raise CliError("--xformers needs --device cuda")
    pipe, resolution, image_size, vae_note = sampling_pipeline(args)
    vanilla = to_stable_diffusion(pipe)
    for p in (pipe, vanilla):
        p.to(device) if dtype == torch.float32 else p.to(device=device, dtype=dtype)
        if args.xformers:
            p.enable_xformers_memory_efficient_attention()
    result = benchmark_sample(pipe, vanilla, prompts(args.batch_size), args.steps, args.repeats, args.guidance,
                              height=resolution, profile=args.profile)
    params = sum(p.numel() for p in pipe.unet.unet.parameters())
    result.update(resolution=resolution, image_size=image_size, guidance=args.guidance, scheduler=type(pipe.scheduler).__name__,
                  vae=vae_note, unet_generation_params=params, xformers=args.xformers,
                  reference="diffusers.StableDiffusionPipeline with the same UNet, text tower, VAE and scheduler")
    return result
