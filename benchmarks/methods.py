"""What a training step of each method costs, side by side: FLOPs (counted, independent of the machine) and time
(measured in interleaved rounds in one process), with each method's ratio to the reference method (default
``clip``, the discriminative reference of the comparison tables).

Every method is built from the same training config (the tiny default with the overrides, ``method=`` set per
arm) with random weights and steps on the same batch of real training images and captions: its input as the trainer
gives it (pixels for the methods that read pixels, latents for the UNet methods), its own loss, backward, and its
own AdamW step (:func:`~diffdis.train.build.build_optimizer`). What this explains: at equal wall-clock a method with
k times the reference's time per step trains k times fewer steps (docs/EXPERIMENTS.md, the equal wall-clock
comparisons).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, Tuple

import torch

from . import accel
from .common import CliError, build_tiny
from .timing import time_interleaved

HELP = "every method's training step on the same batch: FLOPs and time, as ratios to a reference method (clip)"
DEFAULT_METHODS = ("clip", "oner", "disc_only", "gen_only", "diffdis", "unidiff")  # rleg and prior read other models


def summary_keys(args) -> Tuple[str, ...]:
    """The keys printed after a run."""
    return tuple(f"{m}_{k}" for m in args.methods for k in ("gflop", "ms", "flop_ratio", "time_ratio"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``run.py methods``."""
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help=f"methods to step (default: {' '.join(DEFAULT_METHODS)}); rleg needs model.rleg.generator=DIR")
    p.add_argument("--reference", default="clip", help="the method every ratio divides by (default: clip)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=5, help="optimiser steps of each method in each timed round (default: 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON file (default: benchmark_methods.json)")
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # float32: the trainer's default
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)  # train.batch_size=N instead
    p.add_argument("overrides", nargs="*", help="key=value training-config overrides for every method (e.g."
                   " data.name=compositional)")


def _batch(cfg, tokenizer, device: torch.device) -> Dict[str, torch.Tensor]:
    """One training batch of ``train.batch_size`` rows as the trainer's collator makes it."""
    from diffdis.data.transforms import tokenize
    from diffdis.train.build import load_split, make_collator

    rows = load_split(cfg.data, "train", num_samples=cfg.train.batch_size)
    batch = make_collator(cfg, tokenizer, generator=torch.Generator().manual_seed(0))([rows[i] for i in range(len(rows))])
    empty = tokenize(tokenizer, [""])  # (1, L)
    return {"pixel_values": batch["pixel_values"].to(device), "input_ids": batch["input_ids"].to(device),
            "empty_ids": empty.to(device)}


def method_step(cfg, device: torch.device) -> Tuple[Callable[[], None], torch.nn.Module, dict]:
    """A method's training step as a call (forward, backward, AdamW step), the module its FLOPs are counted on,
    and what it ran (input shape, trainable parameters)."""
    from diffdis import methods
    from diffdis.models.components import encode_latents
    from diffdis.train.build import build_optimizer

    components = build_tiny(cfg)
    method = methods.build(cfg, components).to(device)
    if components.vae is not None:
        components.vae.to(device)
    method.train()
    optimizer = build_optimizer(cfg, method, device)
    batch = _batch(cfg, components.tokenizer, device)
    generator = torch.Generator(device=device).manual_seed(0)
    pixels = batch["pixel_values"]  # (B, 3, R, R) in [-1, 1]
    with torch.no_grad():
        inputs = pixels if method.input_space == "pixels" else encode_latents(components.vae, pixels, generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        method(inputs, batch["input_ids"], batch["empty_ids"], generator)["loss"].backward()
        optimizer.step()

    ran = {"input_shape": list(inputs.shape),
           "trainable_parameters": sum(p.numel() for p in method.parameters() if p.requires_grad)}
    return step, method, ran


def run(args, device: torch.device, dtype: torch.dtype) -> dict:
    """FLOPs and median seconds per training step of each method, and their ratios to ``--reference``'s."""
    from diffdis.config import load_config

    if args.reference not in args.methods:
        raise CliError(f"--reference {args.reference} must be one of --methods ({' '.join(args.methods)})")
    if len(set(args.methods)) != len(args.methods):
        raise CliError("--methods lists a method twice")
    steps, flops, ran = {}, {}, {}
    for name in args.methods:
        cfg = load_config(None, [*args.overrides, f"method={name}"])  # ConfigError (a ValueError): one line
        if cfg.model.pretrained:
            raise CliError("methods builds each model from the config; model.pretrained is not used here")
        step, module, ran[name] = method_step(cfg, device)
        unet = getattr(module, "unet", None)  # a diffusers UNet: its attention counted as SDPA
        flops[name] = accel.count_flops(step, unet if hasattr(unet, "attn_processors") else None)  # also the warm-up
        steps[name] = step

    def rounds(step: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            for _ in range(args.steps):
                step()
        return call

    seconds = time_interleaved({n: rounds(s) for n, s in steps.items()}, args.repeats, device)
    median = {n: statistics.median(t) / args.steps for n, t in seconds.items()}
    ref = args.reference
    result: dict = {"model": "configs/tiny.yaml with the overrides, random weights", "methods": list(args.methods), "reference_method": ref, "steps_per_round": args.steps,
                    "overrides": list(args.overrides), "train_batch": cfg.train.batch_size, "ran": ran,
                    "round_seconds": seconds}
    for n in args.methods:
        result.update({f"{n}_gflop": flops[n] / 1e9, f"{n}_ms": median[n] * 1e3,
                       f"{n}_flop_ratio": flops[n] / flops[ref], f"{n}_time_ratio": median[n] / median[ref]})
    return result
