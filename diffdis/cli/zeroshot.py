"""Zero-shot classification and retrieval with a trained diffdis model folder.

    diffdis-zeroshot outputs/run/model --dataset embedded --task all --steps 10 --out zs/
    diffdis-zeroshot outputs/run/model --dataset embedded --task retrieval
    diffdis-zeroshot outputs/run/model --task retrieval --dataset coco/dataset_coco.json --images coco/ --split test
    diffdis-zeroshot outputs/run/model --task cifar10                    # clip-benchmark/wds_vtab-cifar10
    diffdis-zeroshot outputs/run/model --task cifar10 --dataset /data/cifar10_folders
    diffdis-zeroshot outputs/run/model --dataset /data/pets_folders --templates t.json
    accelerate launch --multi_gpu --num_processes 2 -m diffdis.cli.zeroshot outputs/run/model --task all

K, w, the noise samples and the sampler default to the values the training run saved in the model's zero-shot
pipeline (``zeroshot_index.json``); the options below override them for one run.

Methods: ``diffdis`` generates each image's text query with the discrimination stream (K denoising
steps, independent of the number of classes) and takes the arg-max cosine against the class
weights; ``diffusion_classifier`` is the baseline of Li et al. (2023): the class prompt under which
the generation stream denoises the image best. Writes ``results.json`` (CLIP_benchmark metric names,
chance level and every setting) and one ``confusion_<task>.png`` per classification task.

A built-in --task (CLIP_benchmark's sets: ``imagenet1k``, ``cifar10``, ``food101``, ...) brings its class
names, templates and hub dataset; its class names are checked name by name against the dataset's ClassLabel,
so a list in another order is refused. Retrieval reads the embedded captions, a COCO / Flickr30k
Karpathy-split JSON (five captions per image) or a dataset whose caption column holds a list per image.
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
    default_dataset,
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
        "--dataset", default=None,
        help="'embedded', a hub dataset name, a local folder (class subfolders, imagefolder, webdataset shards or a"
        " saved dataset), or for --task retrieval a Karpathy-split JSON (default: the built-in task's hub dataset,"
        " else embedded)",
    )
    p.add_argument(
        "--task", default="all",
        help="embedded: shape, colour, colour_shape or all; retrieval (any --dataset with captions); other datasets:"
        f" a built-in task whose class names/templates to use ({', '.join(zs.task_names())}) or 'auto' (default: all)",
    )
    p.add_argument("--split", default=None, help="dataset split (default: test; embedded retrieval: validation)")
    p.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image noise (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the accelerator's device)")
    p.add_argument("--out", default="zeroshot_results", help="output folder (default: zeroshot_results)")
    p.add_argument("--image-column", default=None, help="image column of a non-embedded dataset (default: image, or"
                   " the dataset's only image column)")
    p.add_argument("--label-column", default=None, help="label column of a non-embedded dataset: integer class ids, a ClassLabel, or strings"
                   " that name classes of --classnames / --task (default: label, or the built-in task's)")
    p.add_argument("--caption-column", default=None, help="retrieval: caption column, one caption or a list per image"
                   " (default: captions, caption, text or sentences)")
    p.add_argument("--images", default=None, help="retrieval on a Karpathy-split JSON: the folder its filepath/filename"
                   " are relative to (default: the JSON file's folder)")
    p.add_argument("--classnames", default=None, help="class names file (JSON list/object or one per line)")
    p.add_argument("--templates", default=None, help="templates file, each with one '{}' (JSON list/object or one per line)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_zero_shot_options(p)
    return p


def _settings(args, settings: ZeroShotSettings, resolution: int, world: int) -> Dict:
    """Every setting of the run, as written into results.json (K, w, n and the sampler as resolved)."""
    dataset = args.dataset or default_dataset(args.task)
    return {"model": str(args.model_dir), "dataset": dataset, "split": args.split, "task": args.task,
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
    accelerator = new_accelerator(cpu=(args.device == "cpu") or not torch.cuda.is_available())
    model = load_zero_shot_pipeline(args.model_dir, args.device or accelerator.device)
    settings = resolved_settings(settings, model)  # "auto" and the saved K, w, n, sampler, as they will run
    resolution = model.resolution
    if args.task == "retrieval":
        embedded = args.dataset in (None, "embedded")
        images, captions = load_retrieval_set(args.split or ("validation" if embedded else "test"), args.num_samples,
                                              resolution, args.dataset, args.images, args.caption_column, args.image_column)
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
