"""Command-line options that several commands share (declared once, read into the library's settings)."""

from __future__ import annotations

import argparse

from diffdis.eval.api import METHODS, ZeroShotSettings
from diffdis.eval.zeroshot import ENSEMBLES
from diffdis.pipelines.zeroshot import TEXT_SCHEDULERS


def add_zero_shot_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The zero-shot feature options; ``prefix`` (e.g. ``"zs-"``) keeps them apart from a command's sampling options.

    K, w, the noise samples and the text sampler default to the values saved in the model's zero-shot pipeline
    (``zeroshot_index.json``, from the training config's ``zeroshot`` section).
    """
    group = parser.add_argument_group("zero-shot")
    group.add_argument(f"--{prefix}method", default="auto", choices=("auto",) + tuple(METHODS),
                       help="classifier: diffdis (the discrimination stream's text queries), diffusion_classifier, or auto:"
                            " the one the model's training method provides (gen_only: diffusion_classifier) (default: auto)")
    group.add_argument(f"--{prefix}steps", type=int, default=None,
                       help="K denoising steps of the text query (default: the model's saved value)")
    group.add_argument(f"--{prefix}guidance", type=float, default=None,
                       help="w: (1+w)Φ(e,t,z) − wΦ(e,t,∅) (default: the model's saved value)")
    group.add_argument(f"--{prefix}noise-samples", type=int, default=None,
                       help="noise samples averaged per image (default: the model's saved value)")
    group.add_argument(f"--{prefix}scheduler", default=None, choices=TEXT_SCHEDULERS,
                       help="text-query sampler (default: the model's saved value)")
    group.add_argument("--ensemble", default="auto", choices=("auto",) + ENSEMBLES,
                       help="template pooling: mean (CLIP's averaged embedding), max (best template per class) or auto"
                       " (the built-in task's choice: max for the embedded shape and colour tasks; else mean) (default: auto)")
    group.add_argument("--dc-timesteps", type=int, default=10,
                       help="timesteps per class of the diffusion classifier (default: 10)")


def zero_shot_settings(args: argparse.Namespace, prefix: str = "", seed: int = 0, batch_size: int = 32) -> ZeroShotSettings:
    """The :class:`ZeroShotSettings` of options added by :func:`add_zero_shot_options` with the same ``prefix``.

    Raises:
        ValueError: a count below 1.
    """
    key = prefix.replace("-", "_")
    get = lambda name: getattr(args, key + name)  # noqa: E731
    for name in ("steps", "noise_samples"):
        if get(name) is not None and get(name) < 1:
            raise ValueError(f"--{prefix}{name.replace('_', '-')} must be >= 1")
    if args.dc_timesteps < 1:
        raise ValueError("--dc-timesteps must be >= 1")
    return ZeroShotSettings(method=get("method"), steps=get("steps"), guidance=get("guidance"),
                            noise_samples=get("noise_samples"), scheduler=get("scheduler"), ensemble=args.ensemble,
                            dc_timesteps=args.dc_timesteps, seed=seed, batch_size=batch_size)
