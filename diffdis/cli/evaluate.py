"""One evaluation report for a trained diffdis model: FID, prompt adherence, zero-shot accuracy, retrieval.

    diffdis-evaluate outputs/tiny/model                   # full: ~5 min on 2 CPU cores
    diffdis-evaluate outputs/tiny/model --quick           # ~1-2 min, what `make demo` runs
    diffdis-evaluate outputs/tiny/model --ablation outputs/ablation/ablation.json
    accelerate launch --multi_gpu --num_processes 2 -m diffdis.cli.evaluate outputs/tiny/model

Writes <out>/report.md (a table, the shapes x colours sample grid, the zero-shot confusion matrices
and the training curves) and <out>/metrics.json (every number with the settings that produced it).

FID is computed on the embedded test split: images generated from its captions against its real
images, in the feature space of the reference attribute classifier (an offline stand-in for
Inception, cached in ~/.cache/diffdis); pass --extractor inception --inception-weights FILE for the
standard 2048-d Inception features (optional `fid` extra). For real-scale runs, --fid-reference DIR
takes an imagefolder with a metadata.jsonl of {"file_name", "text" or "caption"} (e.g. COCO-30k: 30k captions and
their images) and --preset coco30k sets 30,000 images and Inception features.
Prompt adherence: share of images generated from "a {colour} {shape}" (every combination) whose
shape and colour the reference classifier recognises. Generation work is sharded across processes;
FID and adherence are per-process running sums (feature sums, match counts) added over processes, so
neither the generated nor the real images are kept or gathered (memory does not grow with the set).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from diffdis.cli.options import add_zero_shot_options, zero_shot_settings
from diffdis.eval.api import (
    PARTS,
    PRESETS,
    EvaluationError,
    EvaluationOptions,
    SamplingSettings,
    evaluate_model,
    preset_sizes,
    report,
)
from diffdis.eval.report import report_table
from diffdis.eval.zeroshot import TemplateError
from diffdis.pipelines.zeroshot import ZeroShotModelError
from diffdis.utils.distributed import new_accelerator


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the evaluation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a trained model folder (<output_dir>/model)")
    p.add_argument("--out", default=None, help="report folder (default: <model_dir>/../eval)")
    p.add_argument("--quick", action="store_true", help="smaller sets (same as --preset quick)")
    p.add_argument("--preset", default="full", choices=tuple(PRESETS),
                   help="set sizes: full (1000 FID images, 4 per adherence combination, 1000 zero-shot, 500 retrieval),"
                   " quick (500, 2, 600, 200), coco30k (30,000 FID images, Inception; needs --fid-reference)")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    p.add_argument("--fid-images", type=int, default=None, help="generated (and real) images for FID")
    p.add_argument("--adherence-per-combo", type=int, default=None, help="images per shape x colour prompt")
    p.add_argument("--zeroshot-samples", type=int, default=None, help="test images for zero-shot accuracy")
    p.add_argument("--retrieval-samples", type=int, default=None, help="validation images for retrieval")
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
    p.add_argument("--ablation", default=None, help="ablation.json from tools/ablation.py to include in the report")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the accelerator's device)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_zero_shot_options(p, prefix="zs-")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`EvaluationError` for missing files and contradicting options, before anything loads."""
    if not Path(args.model_dir).is_dir():
        raise EvaluationError(f"model folder '{args.model_dir}' does not exist")
    if args.ablation and not Path(args.ablation).is_file():
        raise EvaluationError(f"ablation file '{args.ablation}' does not exist")
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


def options_from_args(args: argparse.Namespace) -> EvaluationOptions:
    """The library's evaluation options for these arguments.

    Raises:
        ValueError: a zero-shot count below 1.
    """
    sizes = preset_sizes("quick" if args.quick else args.preset, fid_images=args.fid_images,
                         adherence_per_combo=args.adherence_per_combo, zeroshot_samples=args.zeroshot_samples,
                         retrieval_samples=args.retrieval_samples)
    return EvaluationOptions(
        sizes=sizes,
        parts=tuple(p for p in PARTS if p not in args.skip),
        sampling=SamplingSettings(args.steps, args.guidance, args.scheduler, args.seed, args.batch_size),
        zeroshot=zero_shot_settings(args, "zs-", seed=args.seed, batch_size=args.batch_size),
        extractor=args.extractor,
        inception_weights=args.inception_weights,
        fid_reference=args.fid_reference,
        reference_steps=args.reference_steps,
        device=args.device,
        progress=args.progress,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 0, or 2 on bad input with a one-line error."""
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model_dir).resolve().parent / "eval"
    start = time.perf_counter()
    try:
        check_args(args)
        if not args.progress:  # loading bars of diffusers / transformers; our own bars follow --progress
            import diffusers
            import transformers

            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        try:
            options = options_from_args(args)
        except ValueError as err:
            raise EvaluationError(str(err)) from None
        accelerator = new_accelerator(cpu=(args.device == "cpu") or not torch.cuda.is_available())
        result = evaluate_model(args.model_dir, options, accelerator)
    except (EvaluationError, ZeroShotModelError, TemplateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["is_main"]:
        report(result, out, time.perf_counter() - start, settings=vars(args), ablation=args.ablation)
        print("\n".join(report_table(result)))
        print(f"\nreport: {out / 'report.md'}\nmetrics: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
