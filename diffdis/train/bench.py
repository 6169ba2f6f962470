"""Timing of the DiffDis training step against the plain diffusers text-to-image step, in one process, interleaved.

The reference is what diffusers' ``examples/text_to_image/train_text_to_image.py`` does each step with the same
UNet (a plain ``UNet2DConditionModel``, the generation branch alone), text tower, noise scheduler, batch and
AdamW settings: encode the captions, noise the whole batch, predict, mean-squared error (Min-SNR weighted with
``diffusers.training_utils.compute_snr`` when ``loss.min_snr_gamma`` is set), backward, optimiser step.
Ours is :class:`~diffdis.train.module.DiffDisMethod`'s step as the trainer runs it (L_IG on ``ig_fraction`` of
the batch, L_ITA through the second stream). The ratio says what the discrimination task costs per step.
"""

from __future__ import annotations

import copy
import statistics
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..pipelines.bench import time_interleaved
from .build import Components, build_optimizer
from ..methods import DiffDisMethod


def _reference_step(cfg, components: Components, latents, input_ids, generator) -> Callable[[], float]:
    """One diffusers-style generation-only step on copies of the generation UNet and the text tower."""
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

    return step


def _ours_step(cfg, components: Components, latents, input_ids, empty_ids, generator) -> Callable[[], float]:
    """One DiffDis step (L_IG + L_ITA) on the components themselves, as the trainer runs it in one process."""
    unet, text_encoder = components.unet.train(), components.text_encoder.train()
    text_encoder.requires_grad_(bool(cfg.model.train_text_encoder))
    module = DiffDisMethod(unet, text_encoder, components.noise_scheduler, cfg.loss)
    module.to(latents.device)  # its alphas_cumprod buffer
    optimizer = build_optimizer(cfg, unet, text_encoder)
    counter = {"step": 0}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = module(latents, input_ids, empty_ids, generator, gather=False, step=counter["step"])
        out["loss"].backward()
        optimizer.step()
        counter["step"] += 1
        return out["loss"].item()

    return step


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
        step), images per second of each, the per-round times and, on CUDA, the peak memory each one's first step
        allocates beyond what was allocated before it (activations, gradients, AdamW states; the weights of both
        models are resident throughout).
    """
    if steps_per_round < 1:
        raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
    device = latents.device
    generator = torch.Generator(device=device).manual_seed(0)
    ref_step = _reference_step(cfg, components, latents, input_ids, generator)  # copies, before ours trains them
    steps = {"ours": _ours_step(cfg, components, latents, input_ids, empty_ids, generator), "reference": ref_step}
    peak: Dict[str, float] = {}
    if device.type == "cuda":
        for name, step in steps.items():  # the first step: activations, gradients and the new AdamW states
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**30

    def rounds(step: Callable[[], float]) -> Callable[[], None]:
        def call() -> None:
            for _ in range(steps_per_round):
                step()

        return call

    times = time_interleaved({name: rounds(step) for name, step in steps.items()}, repeats, device)
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
    if peak:
        result.update(ours_step_peak_gib=peak["ours"], reference_step_peak_gib=peak["reference"],
                      memory_ratio=peak["ours"] / peak["reference"])
    return result
