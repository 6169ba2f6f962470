"""Training speed: DiffDis steps against the plain diffusers text-to-image step, in one process, interleaved.

The reference is what diffusers' ``examples/text_to_image/train_text_to_image.py`` does each step with the same
UNet (a plain ``UNet2DConditionModel``, the generation branch alone), text tower, noise scheduler, batch and
AdamW settings: encode the captions, noise the whole batch, predict, mean-squared error (Min-SNR weighted with
``diffusers.training_utils.compute_snr`` when ``loss.min_snr_gamma`` is set), backward, optimiser step, with
torch's default AdamW as that script builds it. Ours is :class:`~diffdis.methods.DiffDisMethod`'s step as the
trainer runs it (its optimiser from :func:`~diffdis.train.build.build_optimizer`), in two recipes timed in the same
rounds: the config's own (``ours``: L_IG on ``ig_fraction`` of the batch, L_ITA through the second stream) and
equal work (``equal_work``: the same with ``loss.ig_fraction=1.0``, L_IG on the whole batch as the reference). Where
ours runs a faster AdamW than the script's default, the reference also runs with that optimiser
(``reference_same_optimizer``), so that the ratio against it is the cost of the second stream alone.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from diffdis.methods import DiffDisMethod
from diffdis.train.build import Components, build_optimizer

from . import accel
from .common import DTYPES, CliError, build_tiny, prompts, sd15_components
from .timing import qualified_name, time_interleaved
from .train_profile import modules_run, profile_steps

HELP = "DiffDis training steps (its recipe and equal work) vs the diffusers text-to-image step (same UNet, batch)"
Phase = Callable[[str], ContextManager]
Step = Callable[..., float]


def summary_keys(args) -> Tuple[str, ...]:
    """The keys printed after a run."""
    return ("ratio", "equal_work_ratio", "equal_work_ratio_same_optimizer", "ours_step_s", "equal_work_step_s",
            "reference_step_s", "ours_img_s", "reference_img_s", "reference_tflops", "equal_work_tflops",
            "reference_mfu", "equal_work_mfu")


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
    t.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"),
                   help="attention kernels of every arm: PyTorch SDPA or xFormers (CUDA) (default: sdpa)")
    t.add_argument("--channels-last", action="store_true", help="every arm's UNet and latents in channels_last format")
    t.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile each down, mid and up block of every arm's UNet (regional compilation) with this"
                   " backend (default backend: inductor); the warm-up round compiles")
    t.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: from a table of GPUs for bf16/fp16; none on CPU)")
    t.add_argument("--profile-steps", type=int, default=0,
                   help="after the timing, profile this many steps of each arm with torch.profiler and write the time of"
                   " each phase (text encoder, passes forward and backward, optimiser) (default: 0, no profile)")
    t.add_argument("--note", default=None, help="a remark kept in the JSON (e.g. what else ran on the machine)")
    t.add_argument("--out", default=None, help="JSON file (default: benchmark_train.json)")
    t.add_argument("overrides", nargs="*", help="key=value training-config overrides (the model, loss and batch)")


def _input_shape(unet: torch.nn.Module, seen: dict):
    """Keep the per-sample shape of what ``unet`` is called on in ``seen["input_shape"]``, and whether it was in
    channels_last format in ``seen["channels_last"]``; returns the hook."""
    def hook(module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        seen["input_shape"] = list(sample.shape[1:])
        seen["channels_last"] = sample.dim() == 4 and sample.is_contiguous(memory_format=torch.channels_last)

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def _no_phase(name: str) -> ContextManager:
    return nullcontext()


def _reference_step(cfg, components: Components, latents, input_ids, fused: bool) -> Tuple[Step, Dict[str, object]]:
    """One diffusers-style generation-only step on copies of the generation UNet and the text tower, and what it
    runs (its UNet, text tower and optimiser). ``fused``: torch's fused AdamW instead of the script's default."""
    unet = copy.deepcopy(components.unet.unet).train()  # (B, C, h, w) -> (B, C, h, w), a plain UNet2DConditionModel
    text_encoder = copy.deepcopy(components.text_encoder).train()
    text_encoder.requires_grad_(bool(cfg.model.train_text_encoder))
    params = list(unet.parameters()) + [p for p in text_encoder.parameters() if p.requires_grad]
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                  weight_decay=t.weight_decay, fused=fused or None)
    scheduler = components.noise_scheduler
    num_t = scheduler.config.num_train_timesteps
    gamma = cfg.loss.min_snr_gamma
    generator = torch.Generator(device=latents.device).manual_seed(0)

    def step(phase: Phase = _no_phase) -> float:
        optimizer.zero_grad(set_to_none=True)
        with phase("text_encoder"):
            context = text_encoder(input_ids=input_ids).last_hidden_state  # (B, L, d)
        with phase("data"):
            noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
            timesteps = torch.randint(0, num_t, (latents.shape[0],), generator=generator, device=generator.device)
            timesteps = timesteps.to(latents.device)
            noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
            v = scheduler.config.prediction_type == "v_prediction"
            target = scheduler.get_velocity(latents, noise, timesteps) if v else noise
        with phase("generation_forward"):
            pred = unet(noisy, timesteps, context).sample  # (B, C, h, w)
            if gamma is None:
                loss = F.mse_loss(pred.float(), target.float())
            else:  # the diffusers script's Min-SNR weighting
                snr = compute_snr(scheduler, timesteps)
                weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
                weights = weights / (snr + 1) if v else weights / snr
                loss = (F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1) * weights).mean()
        with phase("generation_backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()
        return loss.item()

    return step, {"unet": unet, "text_encoder": text_encoder, "optimizer": optimizer}


def _phased_losses(module: DiffDisMethod, latents, input_ids, empty_ids, generator, phase: Phase, ran: List[str]):
    """:meth:`DiffDisMethod.forward` and the backward of its total, each pass in its own phase (the two losses'
    backward calls each reach the text encoder); the names of the generation UNet's top-level modules that the
    discrimination pass ran are appended to ``ran``."""
    from diffdis.models.components import encode_text

    full = latents.shape[0]
    with phase("text_encoder"):
        ctx_all, query_all = encode_text(module.text_encoder, torch.cat([input_ids, empty_ids]))
    ctx, query, ctx_empty = ctx_all[:full], query_all[:full], ctx_all[full:]  # (B, L, d), (B, d_e), (1, L, d)
    with phase("generation_forward"):
        loss_ig = module.generation_loss(latents, ctx, ctx_empty, generator)
    with phase("discrimination_forward"), modules_run(module.unet.unet) as names:
        ita = module.discrimination_loss(latents, query, ctx_empty, generator, gather=False)
    ran.extend(name for name in names if name not in ran)
    with phase("generation_backward"):
        loss_ig.backward(retain_graph=True)
    with phase("discrimination_backward"):
        (module.options.lambda_ita * ita["loss"]).backward()
    return loss_ig + module.options.lambda_ita * ita["loss"]


def _ours_step(cfg, components: Components, latents, input_ids, empty_ids, copy_components: bool = True
               ) -> Tuple[Step, Dict[str, object]]:
    """One DiffDis step (L_IG + L_ITA) on copies of the components (or on themselves), as the trainer runs it in one
    process, and what it runs (its UNet, text tower and optimiser; with a phase, the modules of the discrimination
    pass)."""
    unet, text_encoder = components.unet, components.text_encoder
    if copy_components:
        unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    unet, text_encoder = unet.train(), text_encoder.train()
    text_encoder.requires_grad_(bool(cfg.model.train_text_encoder))
    module = DiffDisMethod(unet, text_encoder, components.noise_scheduler, cfg.loss)
    module.to(latents.device)  # its alphas_cumprod buffer
    optimizer = build_optimizer(cfg, module)
    generator = torch.Generator(device=latents.device).manual_seed(0)
    counter = {"step": 0}
    ran: List[str] = []

    def step(phase: Optional[Phase] = None) -> float:
        optimizer.zero_grad(set_to_none=True)
        if phase is None:
            loss = module(latents, input_ids, empty_ids, generator, gather=False, step=counter["step"])["loss"]
            loss.backward()
        else:
            loss = _phased_losses(module, latents, input_ids, empty_ids, generator, phase, ran)
        with (phase or _no_phase)("optimizer"):
            optimizer.step()
        counter["step"] += 1
        return loss.item()

    return step, {"unet": unet, "text_encoder": text_encoder, "optimizer": optimizer, "discrimination_ran": ran}


def ratio_spread(ours: List[float], reference: List[float]) -> Dict[str, float]:
    """The per-round ratios ours / reference of interleaved rounds: median, quartiles, extremes and count."""
    ratios = sorted(a / b for a, b in zip(ours, reference))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": ratios[0], "max": ratios[-1],
            "rounds": len(ratios)}


def _cuda_peaks(steps: Dict[str, Step], device: torch.device) -> Dict[str, float]:
    """GiB that each arm's first step allocates beyond what was allocated before it (activations, gradients, AdamW
    states; the weights of every arm are resident throughout)."""
    peak = {}
    for name, step in steps.items():
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    return peak


def benchmark_train(
    cfg,
    components: Components,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    steps_per_round: int = 10,
    repeats: int = 3,
    profile: int = 0,
    attention: str = "sdpa",
    compile_backend: Optional[str] = None,
    peak: Optional[float] = None,
) -> Dict[str, object]:
    """Seconds per training step of DiffDis (the config's recipe and equal work) and of the diffusers reference on the
    same batch, timed in the same interleaved rounds. ``components`` are trained in place by ``ours``; every other arm
    trains copies of them made before any step.

    Args:
        latents: (B, C, h, w) what the UNet trains on (after any VAE). input_ids: (B, L). empty_ids: (1, L).
        steps_per_round: optimiser steps in each timed call.
        profile: steps of each arm profiled by phase after the timing (0: none).
        attention: ``sdpa`` or ``xformers`` in every arm (:func:`benchmarks.accel.set_attention`).
        compile_backend: with a backend, each block of every arm's generation UNet is compiled after the memory peaks
            and FLOP counts (eager) and before the timing, whose warm-up round compiles.
        peak: the device's peak TFLOP/s, for MFU.

    Returns:
        for each arm (``ours``, ``equal_work``, ``reference`` and, where ours runs a faster AdamW than the script's
        default, ``reference_same_optimizer``): the median ``{arm}_step_s``, ``{arm}_img_s``, the per-round times
        ``{arm}_runs_s`` and what it ran (``{arm}_unet``, ``{arm}_text_encoder``, ``{arm}_optimizer`` classes,
        ``{arm}_optimizer_fused``, ``{arm}_unet_input_shape``: the per-sample shape its generation UNet was called on, and
        ``{arm}_unet_input_channels_last``);
        ``ratio`` (ours / reference), ``equal_work_ratio`` and ``equal_work_ratio_same_optimizer`` (median over median:
        above 1, ours is slower per step), ``ratios`` (each ratio's per-round spread, :func:`ratio_spread`); on CUDA
        the peak memory of each arm's first step; each arm's counted FLOPs, achieved TFLOP/s and MFU
        (:func:`benchmarks.accel.utilisation`); with ``profile``, ``profile`` (:func:`profile_steps`) and
        ``discrimination_pass_ran`` (the generation UNet's top-level modules the discrimination pass called).
    """
    if steps_per_round < 1:
        raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
    device = latents.device
    # on the generation UNet, as the trainer sets it (diffdis.methods.base); before the copies: every arm gets it
    accel.set_attention(components.unet.unet, attention)
    equal_cfg = copy.deepcopy(cfg)
    equal_cfg.loss.ig_fraction = 1.0
    steps: Dict[str, Step] = {}
    parts: Dict[str, Dict[str, object]] = {}
    if cfg.loss.ig_fraction != 1.0:
        steps["equal_work"], parts["equal_work"] = _ours_step(equal_cfg, components, latents, input_ids, empty_ids)
    steps["ours"], parts["ours"] = _ours_step(cfg, components, latents, input_ids, empty_ids, copy_components=False)
    steps["reference"], parts["reference"] = _reference_step(cfg, components, latents, input_ids, fused=False)
    fused = bool(parts["ours"]["optimizer"].defaults["fused"])
    if fused:
        steps["reference_same_optimizer"], parts["reference_same_optimizer"] = _reference_step(
            cfg, components, latents, input_ids, fused=True)
    # ours: the generation UNet inside the dual-stream one, which L_IG calls on the noisy latents
    generation = {name: p["unet"].unet if name in ("ours", "equal_work") else p["unet"] for name, p in parts.items()}
    seen: Dict[str, dict] = {name: {} for name in steps}
    hooks = [_input_shape(generation[name], seen[name]) for name in steps]
    try:
        memory = _cuda_peaks(steps, device) if device.type == "cuda" else {}
        flops = {name: accel.count_flops(step, parts[name]["unet"]) for name, step in steps.items()}
        compiled = {name: accel.compile_blocks(generation[name], compile_backend) if compile_backend else 0
                    for name in steps}

        def rounds(step: Step) -> Callable[[], None]:
            def call() -> None:
                for _ in range(steps_per_round):
                    step()

            return call

        times = time_interleaved({name: rounds(step) for name, step in steps.items()}, repeats, device)
    finally:
        for hook in hooks:
            hook.remove()
    times.setdefault("equal_work", times["ours"])
    times.setdefault("reference_same_optimizer", times["reference"])
    batch = latents.shape[0]
    result: Dict[str, object] = {"steps_per_round": steps_per_round, "train_batch": batch,
                                 "latent_shape": list(latents.shape[1:])}
    for name, runs in times.items():
        median = statistics.median(runs) / steps_per_round
        result.update({f"{name}_step_s": median, f"{name}_img_s": batch / median, f"{name}_runs_s": runs})
    ref, same = result["reference_step_s"], result["reference_same_optimizer_step_s"]
    result.update(ratio=result["ours_step_s"] / ref, equal_work_ratio=result["equal_work_step_s"] / ref,
                  equal_work_ratio_same_optimizer=result["equal_work_step_s"] / same,
                  ratios={f"{a}/{b}": ratio_spread(times[a], times[b]) for a in ("ours", "equal_work")
                          for b in ("reference", "reference_same_optimizer")})
    for name in steps:
        result.update({f"{name}_{key}": qualified_name(parts[name][key]) for key in ("unet", "text_encoder", "optimizer")})
        result[f"{name}_optimizer_fused"] = bool(parts[name]["optimizer"].defaults["fused"])
        result[f"{name}_unet_input_shape"] = seen[name].get("input_shape")
        result[f"{name}_unet_input_channels_last"] = seen[name].get("channels_last")
    result.update(accel.utilisation(flops, {name: result[f"{name}_step_s"] for name in steps}, peak),
                  attention=attention, compile=compile_backend, compiled_blocks=compiled)
    result.setdefault("equal_work_tflops", result["ours_tflops"])
    result.setdefault("equal_work_mfu", result["ours_mfu"])
    if memory:
        result.update({f"{name}_step_peak_gib": gib for name, gib in memory.items()})
        result["memory_ratio"] = memory["ours"] / memory["reference"]
    if profile:
        result["profile"] = profile_steps(steps, profile, device, flops)
        arm = "equal_work" if "equal_work" in parts else "ours"
        result["discrimination_pass_ran"] = list(parts[arm]["discrimination_ran"])
    return result


def run(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds per training step of DiffDis (its recipe and equal work) and of the diffusers text-to-image step, and
    their ratios."""
    from diffdis.config import load_config
    from diffdis.train.build import build_noise_scheduler

    if args.profile_steps < 0:
        raise CliError("--profile-steps must be at least 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise CliError("--peak-tflops must be above 0")
    if args.compile:
        accel.check_backend(args.compile)
    # the sd15 preset reads no data: its config only needs some data.name to be complete
    preset = ["data.name=embedded"] if args.preset == "sd15" else []
    cfg = load_config("sd15" if args.preset == "sd15" else None, [*preset, *args.overrides])  # ConfigError: ValueError
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
    if args.channels_last:
        accel.to_channels_last(components.unet)
        latents = latents.contiguous(memory_format=torch.channels_last)
    tok = components.tokenizer
    ids = tok(prompts(batch) + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        result = benchmark_train(cfg, components, latents, ids[:-1], ids[-1:], args.steps_per_round, args.repeats,
                                 args.profile_steps, args.attention, args.compile,
                                 args.peak_tflops or accel.peak_tflops(device, dtype))
    result.update(image_size=image_size, unet_generation_params=sum(p.numel() for p in components.unet.unet.parameters()),
                  preset=args.preset, overrides=list(args.overrides), lambda_ita=cfg.loss.lambda_ita,
                  ig_fraction=cfg.loss.ig_fraction, ita_fraction=cfg.loss.ita_fraction,
                  prediction_type=cfg.noise.prediction_type, note=args.note, channels_last=args.channels_last,
                  load_average_before=load_before, load_average_after=os.getloadavg() if load_before else None,
                  reference="the step of diffusers' train_text_to_image.py: generation only, the whole batch, same UNet,"
                  " text tower, noise scheduler and AdamW settings, torch's default AdamW as that script builds it;"
                  " reference_same_optimizer: the same step with ours's AdamW implementation",
                  equal_work="ours with loss.ig_fraction=1.0: L_IG on the whole batch, as the reference, plus L_ITA")
    return result
