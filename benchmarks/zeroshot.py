"""Zero-shot speed: images/s of DiffDis classification at each class count (the cost must be nearly flat in the
class count), joint vs one_way fusion with the image-feature cache, and the diffusion-classifier baseline
(Li et al. 2023) on the same model and images."""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from diffdis.pipelines.zeroshot import diffusion_classifier_logits
from diffdis.pipelines.zeroshot import TextQuerySampler

from .common import CliError, add_model_arguments, tiny_components
from .timing import time_interleaved, timed

HELP = "zero-shot images/s vs class count, fusion mode, diffusion classifier"


def summary_keys(args) -> Tuple[str, ...]:
    """The keys printed after a run."""
    return (*(f"diffdis_{n}_classes_img_s" for n in args.classes), "class_count_ratio", "one_way_speedup",
            "diffusion_classifier_img_s", "diffusion_classifier_slowdown", "adaptive_dc_img_s", "adaptive_dc_speedup")


def add_arguments(z: argparse.ArgumentParser) -> None:
    """The options of ``run.py zeroshot``."""
    add_model_arguments(z, "zeroshot")
    z.add_argument("--steps", type=int, default=10, help="K text-query denoising steps (default: 10)")
    z.add_argument("--guidance", type=float, default=0.0, help="w on the image condition (default: 0)")
    z.add_argument("--classes", type=int, nargs="+", default=[10, 1000], help="class counts (default: 10 1000)")
    z.add_argument("--dc-timesteps", type=int, default=100,
                   help="diffusion classifier: timesteps per class, as Li et al. use at least (default: 100)")
    z.add_argument("--dc-images", type=int, default=2, help="diffusion classifier: images timed (default: 2)")
    z.add_argument("--dc-keep", type=int, default=5,
                   help="adaptive diffusion classifier: classes kept after the first round (default: 5)")
    z.add_argument("--dc-first-timesteps", type=int, default=None,
                   help="adaptive diffusion classifier: timesteps of the first round (default: a fifth of --dc-timesteps)")


def _as_fusion(unet, fusion: str):
    """A copy of ``unet`` with another fusion mode and the same weights (fusion adds no parameters)."""
    from diffdis.models.dual_stream_unet import DualStreamUNet, move_like

    if unet.config.fusion == fusion:
        return unet
    config = {k: v for k, v in unet._internal_dict.items() if not k.startswith("_")}
    other = DualStreamUNet(**{**config, "fusion": fusion})
    other.load_state_dict(unet.state_dict())
    return move_like(other, unet.device, unet.dtype).eval()


def benchmark_zeroshot(
    unet,
    scheduler_config: Dict,
    empty_context: torch.Tensor,
    latents: torch.Tensor,
    steps: int = 10,
    guidance: float = 0.0,
    class_counts: Sequence[int] = (10, 1000),
    dc_classes: int = 10,
    dc_timesteps: int = 100,
    dc_images: int = 2,
    dc_keep: int = 5,
    dc_first_timesteps: Optional[int] = None,
    repeats: int = 3,
    seed: int = 0,
) -> Dict[str, object]:
    """Images/s of DiffDis zero-shot classification vs the class count, the diffusion classifier, and fusion modes.

    Returns ``diffdis_{n}_classes_img_s`` per class count and ``class_count_ratio`` (first / last:
    about 1, the cost is O(steps) per image), ``joint_img_s``, ``one_way_cached_img_s`` and
    ``one_way_speedup`` (same weights, fusion switched), ``diffusion_classifier_img_s`` (``dc_classes``
    classes × ``dc_timesteps`` UNet passes per image, timed once on ``dc_images`` images) and
    ``diffusion_classifier_slowdown`` (DiffDis at the first class count / diffusion classifier),
    ``adaptive_dc_img_s`` (the same classifier keeping ``dc_keep`` classes after ``dc_first_timesteps``, default a
    fifth of the timesteps) and ``adaptive_dc_speedup`` (its images/s over the exhaustive one's), with what each
    arm ran: ``{arm}_predictions_shape`` of each timed DiffDis call, the fusion and cache of the two fusion arms,
    ``diffusion_classifier_logits_shape`` and ``latent_shape``. Class weights and contexts are random: only their
    sizes matter for speed.
    """
    from diffusers import DDPMScheduler

    device, b = unet.device, latents.shape[0]
    latents = latents.to(device)
    g = torch.Generator().manual_seed(seed)
    d, ctx_len, ctx_dim = unet.config.text_dim, empty_context.shape[1], empty_context.shape[2]
    seen: Dict[str, object] = {}

    def classify(arm: str, sampler: TextQuerySampler, weights: torch.Tensor) -> Callable[[], object]:
        def call() -> torch.Tensor:
            queries = sampler(latents, steps, guidance, generator=torch.Generator().manual_seed(seed))  # (B, d)
            preds = (queries @ weights).argmax(dim=1)  # (B,)
            seen[f"{arm}_predictions_shape"] = list(preds.shape)
            return preds

        return call

    sampler = TextQuerySampler(unet, scheduler_config, empty_context, 1.0)
    weights = {n: F.normalize(torch.randn(d, n, generator=g), dim=0).to(device) for n in class_counts}
    arms = {f"diffdis_{n}_classes": classify(f"diffdis_{n}_classes", sampler, weights[n]) for n in class_counts}
    for fusion, arm in (("joint", "joint"), ("one_way", "one_way_cached")):
        fused = TextQuerySampler(_as_fusion(unet, fusion), scheduler_config, empty_context, 1.0)
        arms[arm] = classify(arm, fused, weights[class_counts[0]])
        seen.update({f"{arm}_fusion": fused.unet.config.fusion, f"{arm}_uses_cache": fused.use_cache})
    out: Dict[str, object] = {"steps": steps, "guidance": guidance, "batch_size": b, "dc_timesteps": dc_timesteps,
                              "dc_classes": dc_classes, "class_counts": list(class_counts),
                              "latent_shape": list(latents.shape[1:])}
    times = time_interleaved(arms, repeats, device)
    out.update({f"{arm}_img_s": b / statistics.median(t) for arm, t in times.items()})
    first, last = (f"diffdis_{n}_classes_img_s" for n in (class_counts[0], class_counts[-1]))
    out["class_count_ratio"] = out[first] / out[last]
    out["one_way_speedup"] = out["one_way_cached_img_s"] / out["joint_img_s"]

    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    contexts = torch.randn(dc_classes, ctx_len, ctx_dim, generator=g).to(device=device, dtype=unet.dtype)
    few = latents[:dc_images]

    first_round = dc_first_timesteps or max(1, dc_timesteps // 5)
    out.update(dc_keep=dc_keep, dc_first_timesteps=first_round)

    def diffusion_classifier(keep: Optional[int] = None) -> Callable[[], None]:
        def call() -> None:
            logits = diffusion_classifier_logits(unet, few, contexts, noise_scheduler, dc_timesteps, g, keep=keep,
                                                 first_timesteps=first_round)
            seen["adaptive_dc_logits_shape" if keep else "diffusion_classifier_logits_shape"] = list(logits.shape)

        return call

    seconds = timed(diffusion_classifier(), device)
    out["diffusion_classifier_img_s"] = few.shape[0] / seconds
    out["adaptive_dc_img_s"] = few.shape[0] / timed(diffusion_classifier(dc_keep), device)
    out["adaptive_dc_speedup"] = out["adaptive_dc_img_s"] / out["diffusion_classifier_img_s"]
    out["diffusion_classifier_slowdown"] = out[first] / out["diffusion_classifier_img_s"]
    out.update(seen)
    return out


def run(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Images/s of the DiffDis classifier and of the diffusion classifier on the same model and images."""
    from diffdis.data.embedded import make_embedded_dataset
    from diffdis.data.transforms import to_pixel_values
    from diffdis.models.components import encode_text
    from diffdis.pipelines.zeroshot import images_to_latents, tokenize
    from diffdis.pipelines.zeroshot_pipeline import load_zero_shot_pipeline

    if args.preset == "sd15" and not args.model:
        raise CliError("zeroshot --preset sd15 is not supported without --model; use --model <folder>")
    vae = None
    if args.model:
        m = load_zero_shot_pipeline(args.model, device)
        unet, text_encoder, tokenizer, sched_config, vae, resolution = (
            m.unet, m.text_encoder, m.tokenizer, dict(m.scheduler.config), m.vae, m.resolution)
    else:
        tokenizer, text_encoder, unet, sched, resolution, vae = tiny_components()
        sched_config = dict(sched.config)
    cast = {"device": device} if dtype == torch.float32 else {"device": device, "dtype": dtype}
    unet, text_encoder = unet.to(**cast).eval(), text_encoder.to(**cast).eval()
    if vae is not None:
        vae = vae.to(**cast)
    images = make_embedded_dataset("test", args.batch_size, resolution=resolution)["image"]
    pixels = torch.stack([to_pixel_values(im.convert("RGB")) for im in images]).to(device=device, dtype=dtype)
    with torch.no_grad():
        latents = images_to_latents(pixels, vae)
        empty = encode_text(text_encoder, tokenize(tokenizer, [""], device))[0]
    result = benchmark_zeroshot(
        unet, sched_config, empty, latents, steps=args.steps, guidance=args.guidance, class_counts=tuple(args.classes),
        dc_classes=args.classes[0], dc_timesteps=args.dc_timesteps, dc_images=min(args.dc_images, args.batch_size),
        dc_keep=args.dc_keep, dc_first_timesteps=args.dc_first_timesteps,
        repeats=args.repeats,
    )
    result.update(resolution=resolution, images="embedded test split",
                  reference="diffdis.pipelines.zeroshot.diffusion_classifier_logits (Li et al. 2023): dc_classes x"
                  " dc_timesteps UNet passes per image on the same UNet and images; its adaptive form against it")
    return result
