"""Training speed: one DiffDis step against the plain diffusers text-to-image step, in one process, interleaved.

The reference is what diffusers' ``examples/text_to_image/train_text_to_image.py`` does each step with the same
UNet (a plain ``UNet2DConditionModel``, the generation branch alone), text tower, noise scheduler, batch and
AdamW settings: encode the captions, noise the whole batch, predict, mean-squared error (Min-SNR weighted with
``diffusers.training_utils.compute_snr`` when ``loss.min_snr_gamma`` is set), backward, optimiser step.
Ours is :class:`~diffdis.methods.DiffDisMethod`'s step as the trainer runs it (L_IG on ``ig_fraction`` of
the batch, L_ITA through the second stream). The ratio says what the discrimination task costs per step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from diffdis.train.build import Components, build_optimizer
from diffdis.methods import DiffDisMethod

from .common import DTYPES, CliError, build_tiny, prompts, sd15_components
from .timing import qualified_name, time_interleaved

HELP = "a DiffDis training step vs the diffusers text-to-image step (same UNet, batch, AdamW)"
Step = Callable[[], float]


def summary_keys(args) -> Tuple[str, ...]:
    """The keys printed after a run."""
    return ("ratio", "ours_step_s", "reference_step_s", "ours_img_s", "reference_img_s")


def add_arguments(t: argparse.ArgumentParser) -> None:
    """The options of ``run.py train``."""
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


def _input_shape(unet: torch.nn.Module, seen: dict):
    """Keep the per-sample shape of what ``unet`` is called on in ``seen["input_shape"]``; returns the hook."""
    def hook(module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        seen["input_shape"] = list(sample.shape[1:])

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def _reference_step(cfg, components: Components, latents, input_ids, generator) -> Tuple[Step, Dict[str, object]]:
    """One diffusers-style generation-only step on copies of the generation UNet and the text tower, and what it
    runs (its UNet, text tower and optimiser)."""
    unet = copy.deepcopy(components.unet.unet).train()  # (B, C, h, w) -> (B, C, h, w), a plain UNet2DConditionModel
    text_encoder = copy.deepcopy(components.text_encoder).train()
    text_encoder.requires_grad_(bool(cfg.model.train_text_encoder))
    params = list(unet.parameters()) + [p for p in text_encoder.parameters() if p.requires_grad]
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                  weight_decay=t.weight_decay)
    scheduler = components.noise_scheduler
    num_t = scheduler.config.num_train_timesteps
    gamma = cfg.loss.min_snr_gamma

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        context = text_encoder(input_ids=input_ids).last_hidden_state  # (B, L, d)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        timesteps = torch.randint(0, num_t, (latents.shape[0],), generator=generator, device=generator.device)
        timesteps = timesteps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
        v = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(latents, noise, timesteps) if v else noise
        pred = unet(noisy, timesteps, context).sample  # (B, C, h, w)
        if gamma is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:  # the diffusers script's Min-SNR weighting
            snr = compute_snr(scheduler, timesteps)
            weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
            weights = weights / (snr + 1) if v else weights / snr
            loss = (F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1) * weights).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, {"unet": unet, "text_encoder": text_encoder, "optimizer": optimizer}


def _ours_step(cfg, components: Components, latents, input_ids, empty_ids, generator) -> Tuple[Step, Dict[str, object]]:
    """One DiffDis step (L_IG + L_ITA) on the components themselves, as the trainer runs it in one process, and
    what it runs (its UNet, text tower and optimiser)."""
    unet, text_encoder = components.unet.train(), components.text_encoder.train()
    text_encoder.requires_grad_(bool(cfg.model.train_text_encoder))
    module = DiffDisMethod(unet, text_encoder, components.noise_scheduler, cfg.loss)
    module.to(latents.device)  # its alphas_cumprod buffer
    optimizer = build_optimizer(cfg, module)
    counter = {"step": 0}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = module(latents, input_ids, empty_ids, generator, gather=False, step=counter["step"])
        out["loss"].backward()
        optimizer.step()
        counter["step"] += 1
        return out["loss"].item()

    return step, {"unet": unet, "text_encoder": text_encoder, "optimizer": optimizer}


def benchmark_train(
    cfg,
    components: Components,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    steps_per_round: int = 10,
    repeats: int = 3,
) -> Dict[str, object]:
    """Seconds per training step of DiffDis and of the diffusers reference on the same batch.

    ``components`` are trained in place (the reference trains copies of the generation UNet and text tower).

    Args:
        latents: (B, C, h, w) what the UNet trains on (after any VAE). input_ids: (B, L). empty_ids: (1, L).
        steps_per_round: optimiser steps in each timed call.

    Returns:
        medians ``ours_step_s`` and ``reference_step_s``, ``ratio`` (ours / reference: above 1, ours is slower per
        step), images per second of each, the per-round times, what each arm ran (``{arm}_unet``,
        ``{arm}_text_encoder`` and ``{arm}_optimizer`` classes; ``{arm}_unet_input_shape``, the per-sample shape
        its generation UNet was called on) and, on CUDA, the peak memory each one's first step allocates beyond
        what was allocated before it (activations, gradients, AdamW states; the weights of both models are
        resident throughout).
    """
    if steps_per_round < 1:
        raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
    device = latents.device
    generator = torch.Generator(device=device).manual_seed(0)
    ref_step, ref_parts = _reference_step(cfg, components, latents, input_ids, generator)  # copies, before ours trains
    our_step, our_parts = _ours_step(cfg, components, latents, input_ids, empty_ids, generator)
    steps = {"ours": our_step, "reference": ref_step}
    parts = {"ours": our_parts, "reference": ref_parts}
    # ours: the generation UNet inside the dual-stream one, which L_IG calls on the noisy latents
    generation = {"ours": our_parts["unet"].unet, "reference": ref_parts["unet"]}
    seen: Dict[str, dict] = {name: {} for name in steps}
    hooks = [_input_shape(generation[name], seen[name]) for name in steps]
    peak: Dict[str, float] = {}
    try:
        if device.type == "cuda":
            for name, step in steps.items():  # the first step: activations, gradients and the new AdamW states
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                peak[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**30

        def rounds(step: Step) -> Callable[[], None]:
            def call() -> None:
                for _ in range(steps_per_round):
                    step()

            return call

        times = time_interleaved({name: rounds(step) for name, step in steps.items()}, repeats, device)
    finally:
        for hook in hooks:
            hook.remove()
    ours = statistics.median(times["ours"]) / steps_per_round
    reference = statistics.median(times["reference"]) / steps_per_round
    batch = latents.shape[0]
    result: Dict[str, object] = {
        "ours_step_s": ours,
        "reference_step_s": reference,
        "ratio": ours / reference,
        "ours_img_s": batch / ours,
        "reference_img_s": batch / reference,
        "ours_runs_s": times["ours"],
        "reference_runs_s": times["reference"],
        "steps_per_round": steps_per_round,
        "train_batch": batch,
        "latent_shape": list(latents.shape[1:]),
    }
    for name in steps:
        result.update({f"{name}_{key}": qualified_name(part) for key, part in parts[name].items()})
        result[f"{name}_unet_input_shape"] = seen[name].get("input_shape")
    if peak:
        result.update(ours_step_peak_gib=peak["ours"], reference_step_peak_gib=peak["reference"],
                      memory_ratio=peak["ours"] / peak["reference"])
    return result


def run(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds per training step of DiffDis and of the diffusers text-to-image step, and their ratio."""
    from diffdis.config import load_config
    from diffdis.train.build import build_noise_scheduler

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
    tok = components.tokenizer
    ids = tok(prompts(batch) + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        result = benchmark_train(cfg, components, latents, ids[:-1], ids[-1:], args.steps_per_round, args.repeats)
    result.update(image_size=image_size, unet_generation_params=sum(p.numel() for p in components.unet.unet.parameters()),
                  preset=args.preset, overrides=list(args.overrides), lambda_ita=cfg.loss.lambda_ita,
                  ig_fraction=cfg.loss.ig_fraction, prediction_type=cfg.noise.prediction_type,
                  reference="the step of diffusers' train_text_to_image.py: generation only, the whole batch, same UNet,"
                  " text tower, noise scheduler and AdamW settings")
    return result
