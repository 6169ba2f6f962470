"""Zero-shot classification and retrieval with a trained diffdis model folder.

    diffdis-zeroshot outputs/run/model --dataset embedded --task all --steps 10 --out zs/
    diffdis-zeroshot outputs/run/model --dataset embedded --task retrieval
    diffdis-zeroshot outputs/run/model --dataset cifar10 --task cifar10 --label-column label
    diffdis-zeroshot outputs/run/model --dataset /data/pets_folders --templates t.json
    accelerate launch --multi_gpu --num_processes 2 -m diffdis.cli.zeroshot outputs/run/model --task all

K, w, the noise samples and the sampler default to the values the training run saved in the model's zero-shot
pipeline (``zeroshot_index.json``); the options below override them for one run.

Methods: ``diffdis`` generates each image's text query with the discrimination stream (K denoising
steps, independent of the number of classes) and takes the arg-max cosine against the class
weights; ``diffusion_classifier`` is the baseline of Li et al. (2023): the class prompt under which
the generation stream denoises the image best. Writes ``results.json`` (CLIP_benchmark metric names,
chance level and every setting) and one ``confusion_<task>.png`` per classification task.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from diffdis.eval import zeroshot as zs
from diffdis.cli.options import add_zero_shot_options, zero_shot_settings
from diffdis.eval.api import (
    EvaluationError,
    ZeroShotSettings,
    load_retrieval_set,
    load_zero_shot_tasks,
    resolved_settings,
    retrieval,
    zero_shot,
)
from diffdis.eval.report import write_zero_shot_results, zero_shot_table
from diffdis.pipelines.zeroshot import ZeroShotModelError
from diffdis.pipelines.zeroshot_pipeline import load_zero_shot_pipeline
from diffdis.utils.distributed import new_accelerator


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the zero-shot evaluation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a trained model folder (<output_dir>/model) with a DualStreamUNet in unet/")
    p.add_argument(
        "--dataset", default="embedded",
        help="'embedded', a hub dataset name, or a local folder (class subfolders or imagefolder) (default: embedded)",
    )
    p.add_argument(
        "--task", default="all",
        help="embedded: shape, colour, colour_shape, all or retrieval; other datasets: a built-in task "
        f"whose class names/templates to use ({', '.join(zs.task_names())}) or 'auto' (default: all)",
    )
    p.add_argument("--split", default=None, help="dataset split (default: test; validation for retrieval)")
    p.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image noise (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the accelerator's device)")
    p.add_argument("--out", default="zeroshot_results", help="output folder (default: zeroshot_results)")
    p.add_argument("--image-column", default="image", help="image column of a non-embedded dataset (default: image)")
    p.add_argument("--label-column", default="label", help="label column of a non-embedded dataset: integer class ids, a ClassLabel, or strings"
                   " that name classes of --classnames / --task (default: label)")
    p.add_argument("--classnames", default=None, help="class names file (JSON list/object or one per line)")
    p.add_argument("--templates", default=None, help="templates file, each with one '{}' (JSON list/object or one per line)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_zero_shot_options(p)
    return p


def _settings(args, settings: ZeroShotSettings, resolution: int, world: int) -> Dict:
    """Every setting of the run, as written into results.json (K, w, n and the sampler as resolved)."""
    return {"model": str(args.model_dir), "dataset": args.dataset, "split": args.split, "task": args.task,
            **{k: v for k, v in asdict(settings).items() if k != "batch_size"},
            "num_samples": args.num_samples, "resolution": resolution, "num_processes": world}


def run(args: argparse.Namespace) -> int:
    """Load, evaluate, write; raises :class:`EvaluationError` on bad input."""
    if args.batch_size < 1:
        raise EvaluationError("--batch-size must be >= 1")
    try:
        settings = zero_shot_settings(args, seed=args.seed, batch_size=args.batch_size)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    if args.task == "retrieval" and args.dataset != "embedded":
        raise EvaluationError("--task retrieval is available on the embedded dataset only")
    accelerator = new_accelerator(cpu=(args.device == "cpu") or not torch.cuda.is_available())
    model = load_zero_shot_pipeline(args.model_dir, args.device or accelerator.device)
    settings = resolved_settings(settings, model)  # "auto" and the saved K, w, n, sampler, as they will run
    resolution = model.resolution
    if args.task == "retrieval":
        images, captions = load_retrieval_set(args.split or "validation", args.num_samples, resolution)
        results = retrieval(model, images, captions, settings, accelerator, args.progress)
    else:
        images, tasks = load_zero_shot_tasks(args.dataset, args.task, args.split, args.num_samples, resolution,
                                             args.image_column, args.label_column, args.classnames, args.templates)
        results = zero_shot(model, tasks, images, settings, accelerator, args.progress)
    if accelerator.is_main_process:
        path = write_zero_shot_results(Path(args.out), results,
                                       _settings(args, settings, resolution, accelerator.num_processes))
        print("\n".join(zero_shot_table(results)))
        print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0, or 2 on bad input with a one-line error)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (EvaluationError, ZeroShotModelError, zs.TemplateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
