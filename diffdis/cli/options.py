"""Command-line options that several commands share (declared once, read into the library's settings)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import NoReturn, Optional

from diffdis.eval.api import (
    METHODS,
    PARTS,
    PRESETS,
    EvaluationError,
    QUICK_DC_KEEP,
    EvaluationOptions,
    SamplingSettings,
    ZeroShotSettings,
    preset_sizes,
)
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
                       help="w: (1+w)Φ(e,t,z) − wΦ(e,t,∅) (default: the model's saved value; w != 0 needs a model"
                       " trained with loss.p_uncond > 0)")
    group.add_argument(f"--{prefix}noise-samples", type=int, default=None,
                       help="noise samples averaged per image (default: the model's saved value)")
    group.add_argument(f"--{prefix}scheduler", default=None, choices=TEXT_SCHEDULERS,
                       help="text-query sampler (default: the model's saved value)")
    group.add_argument("--ensemble", default="auto", choices=("auto",) + ENSEMBLES,
                       help="template pooling: mean (CLIP's averaged embedding), max (best template per class) or auto"
                       " (the built-in task's choice: max for the embedded shape and colour tasks; else mean) (default: auto)")
    group.add_argument("--dc-timesteps", type=int, default=10,
                       help="timesteps per class of the diffusion classifier (default: 10)")
    group.add_argument("--dc-keep", type=int, default=None,
                       help="diffusion classifier, adaptive (Li et al. 2023): score every class on --dc-first-timesteps"
                       " timesteps, then only each image's N best classes on the others; 0: every class at every"
                       f" timestep (default: 0; {QUICK_DC_KEEP} with --quick)")
    group.add_argument("--dc-first-timesteps", type=int, default=None,
                       help="timesteps of the first round with --dc-keep (default: 2, or --dc-timesteps if fewer)")


def zero_shot_settings(args: argparse.Namespace, prefix: str = "", seed: int = 0, batch_size: int = 32,
                       dc_keep: Optional[int] = None) -> ZeroShotSettings:
    """The :class:`ZeroShotSettings` of options added by :func:`add_zero_shot_options` with the same ``prefix``;
    ``dc_keep`` is the diffusion classifier's ``keep`` where ``--dc-keep`` is not given (None: every class).

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
    if args.dc_keep is not None and args.dc_keep < 0:
        raise ValueError("--dc-keep must be >= 0 (0: every class)")
    first = args.dc_first_timesteps if args.dc_first_timesteps is not None else min(2, args.dc_timesteps)
    if not 1 <= first <= args.dc_timesteps:
        raise ValueError(f"--dc-first-timesteps must be between 1 and --dc-timesteps ({args.dc_timesteps})")
    return ZeroShotSettings(method=get("method"), steps=get("steps"), guidance=get("guidance"),
                            noise_samples=get("noise_samples"), scheduler=get("scheduler"), ensemble=args.ensemble,
                            dc_timesteps=args.dc_timesteps, dc_keep=_dc_keep(args.dc_keep, dc_keep),
                            dc_first_timesteps=first, seed=seed, batch_size=batch_size)


def _dc_keep(given: Optional[int], default: Optional[int]) -> Optional[int]:
    keep = default if given is None else given
    return keep or None  # 0: every class


# ---------------------------------------------------------------------------- evaluation of a model folder
def add_evaluation_options(p: argparse.ArgumentParser) -> None:
    """The options of :func:`diffdis.eval.api.evaluate_model` (set sizes, parts, sampling, FID features, zero-shot):
    ``diffdis-evaluate``'s, and the ``--eval-args`` of the ablation and comparison commands."""
    p.add_argument("--quick", action="store_true",
                   help=f"smaller sets, and the diffusion classifier keeps {QUICK_DC_KEEP} classes per image after its"
                   " first round (same as --preset quick)")
    p.add_argument("--preset", default="full", choices=tuple(PRESETS),
                   help="set sizes: full (1000 FID images, 4 per adherence combination, 1000 zero-shot, 500 retrieval,"
                   " 480 per compositional task), quick (500, 2, 600, 200, 240), coco30k (30,000 FID images, Inception;"
                   " needs --fid-reference)")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    p.add_argument("--fid-images", type=int, default=None, help="generated (and real) images for FID")
    p.add_argument("--adherence-per-combo", type=int, default=None, help="images per shape x colour prompt")
    p.add_argument("--zeroshot-samples", type=int, default=None, help="test images for zero-shot accuracy")
    p.add_argument("--retrieval-samples", type=int, default=None, help="validation images for retrieval")
    p.add_argument("--compositional-samples", type=int, default=None,
                   help="test images per compositional task (scored for models trained on data.name=compositional)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default: 3)")
    p.add_argument("--scheduler", default="ddim", help="sampling scheduler (default: ddim)")
    p.add_argument("--seed", type=int, default=0, help="seed of generation and zero-shot noise (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--extractor", default="reference", choices=("reference", "inception"),
                   help="FID feature space (default: reference, the embedded reference classifier)")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file for --extractor inception")
    p.add_argument("--fid-reference", default=None,
                   help="imagefolder with metadata.jsonl (file_name, text) as FID reference (default: embedded test)")
    p.add_argument("--reference-steps", type=int, default=800,
                   help="training steps of the reference classifier when it is not cached yet (default: 800)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the accelerator's device)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_zero_shot_options(p, prefix="zs-")


def check_evaluation_args(args: argparse.Namespace) -> None:
    """Raise :class:`EvaluationError` for contradicting options and missing files, before anything loads
    (``--preset coco30k`` implies ``--extractor inception``)."""
    if args.preset == "coco30k" and not args.fid_reference:
        raise EvaluationError("--preset coco30k needs --fid-reference DIR (captions and images of the reference set)")
    if args.preset == "coco30k":
        args.extractor = "inception"
    if args.extractor == "inception" and "fid" not in args.skip:
        if not args.inception_weights:
            raise EvaluationError("--extractor inception needs --inception-weights FILE (nothing can be downloaded)")
        if not Path(args.inception_weights).expanduser().is_file():
            raise EvaluationError(f"Inception weights not found at {args.inception_weights}; put the"
                                  " pt_inception-2015-12-05 weights file there (torch-fidelity releases)")


def evaluation_options(args: argparse.Namespace) -> EvaluationOptions:
    """The library's evaluation options for options added by :func:`add_evaluation_options`.

    Raises:
        EvaluationError: a bad set size or zero-shot count.
    """
    try:
        preset = "quick" if args.quick else args.preset
        sizes = preset_sizes(preset, fid_images=args.fid_images,
                             adherence_per_combo=args.adherence_per_combo, zeroshot_samples=args.zeroshot_samples,
                             retrieval_samples=args.retrieval_samples, compositional_samples=args.compositional_samples)
        zeroshot = zero_shot_settings(args, "zs-", seed=args.seed, batch_size=args.batch_size,
                                      dc_keep=QUICK_DC_KEEP if preset == "quick" else None)
    except ValueError as err:  # EvaluationError is a ValueError too
        raise EvaluationError(str(err)) from None
    return EvaluationOptions(
        sizes=sizes,
        parts=tuple(p for p in PARTS if p not in args.skip),
        sampling=SamplingSettings(args.steps, args.guidance, args.scheduler, args.seed, args.batch_size),
        zeroshot=zeroshot,
        extractor=args.extractor,
        inception_weights=args.inception_weights,
        fid_reference=args.fid_reference,
        reference_steps=args.reference_steps,
        device=args.device,
        progress=args.progress,
    )


class _RaisingParser(argparse.ArgumentParser):
    """An argument parser whose errors raise :class:`EvaluationError` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise EvaluationError(f"--eval-args: {message}")


def parse_evaluation_args(text: str) -> EvaluationOptions:
    """The evaluation options of a ``diffdis-evaluate`` argument string (without the model folder), e.g.
    ``"--quick --skip retrieval"``.

    Raises:
        EvaluationError: an unknown or bad option.
    """
    parser = _RaisingParser(prog="--eval-args", add_help=False)
    add_evaluation_options(parser)
    args = parser.parse_args(shlex.split(text))
    check_evaluation_args(args)
    return evaluation_options(args)
