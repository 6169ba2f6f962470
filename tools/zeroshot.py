#!/usr/bin/env python
"""Zero-shot classification and retrieval with a trained diffdis model folder.

    python tools/zeroshot.py outputs/run/model --dataset embedded --task all --steps 10 --out zs/
    python tools/zeroshot.py outputs/run/model --dataset embedded --task retrieval
    python tools/zeroshot.py outputs/run/model --dataset cifar10 --task cifar10 --label-column label
    python tools/zeroshot.py outputs/run/model --dataset /data/pets_folders --templates t.json
    accelerate launch --multi_gpu --num_processes 2 tools/zeroshot.py outputs/run/model --task all

Methods: ``diffdis`` generates each image's text query with the discrimination stream (K denoising
steps, independent of the number of classes) and takes the arg-max cosine against the class
weights; ``diffusion_classifier`` is the baseline of Li et al. (2023): the class prompt under which
the generation stream denoises the image best. Writes ``results.json`` (CLIP_benchmark metric names,
chance level and every setting) and one ``confusion_<task>.png`` per classification task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffdis.eval import zeroshot as zs  # noqa: E402
from diffdis.pipelines.zeroshot import (  # noqa: E402
    TEXT_SCHEDULERS,
    TextQuerySampler,
    ZeroShotModelError,
    check_dual_stream_folder,
    images_to_latents,
    load_zero_shot_model,
)

METHODS = ("diffdis", "diffusion_classifier")


class CliError(Exception):
    """A bad input: reported as one line, exit status 2."""


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
    p.add_argument("--method", default="diffdis", choices=METHODS, help="classifier (default: diffdis)")
    p.add_argument("--steps", type=int, default=10, help="K denoising steps of the text query (default: 10)")
    p.add_argument("--guidance", type=float, default=0.0, help="w: (1+w)Φ(e,t,z) − wΦ(e,t,∅) (default: 0)")
    p.add_argument("--noise-samples", type=int, default=1, help="noise samples averaged per image (default: 1)")
    p.add_argument("--ensemble", default="auto", choices=("auto",) + zs.ENSEMBLES,
                   help="template pooling: mean (CLIP's averaged embedding), max (best template per class) or auto"
                   " (the built-in task's choice: max for the embedded shape and colour tasks; else mean) (default: auto)")
    p.add_argument("--scheduler", default="ddim", choices=TEXT_SCHEDULERS, help="text-query sampler (default: ddim)")
    p.add_argument("--dc-timesteps", type=int, default=10, help="diffusion classifier: timesteps per class (default: 10)")
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
    return p


# ---------------------------------------------------------------------------- datasets
def _load_hf_dataset(name: str, split: str):
    import datasets

    path = Path(name)
    try:
        if path.is_dir():  # class subfolders (labels from folder names) or imagefolder with metadata
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        return datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CliError(f"cannot load dataset '{name}' split '{split}': {str(err).splitlines()[0]}") from None


def _check_column(dataset, column: str, kind: str) -> None:
    if column not in dataset.column_names:
        raise CliError(f"unknown {kind} column '{column}'; the dataset has: {', '.join(dataset.column_names)}")


def _classnames_for(dataset, args) -> Tuple[Optional[List[str]], List[str]]:
    """Class names (file > built-in task > ClassLabel feature; None without any of them) and templates."""
    names, templates = None, ["a photo of a {}."]
    if args.task not in ("auto", "all"):
        names, templates = zs.load_task(args.task)
    feature = dataset.features.get(args.label_column)
    if args.classnames:
        names = zs.load_classnames_file(args.classnames)
    elif names is None and getattr(feature, "num_classes", None) is not None:
        names = list(feature.names)
    if args.templates:
        templates = zs.load_templates_file(args.templates)
    return names, templates


def _label_ids(dataset, column: str, names: Optional[List[str]]) -> torch.Tensor:
    """Class ids of ``column``: a ClassLabel or integers as they are, strings mapped to their index in ``names``."""
    import datasets

    feature = dataset.features.get(column)
    dtype = getattr(feature, "dtype", "")
    if isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value) and dtype.startswith(("int", "uint"))):
        return torch.tensor(dataset[column]).long()
    strings = isinstance(feature, datasets.Value) and dtype in ("string", "large_string")
    if strings and names is not None:
        return _ids_from_names(dataset[column], names, column)
    hint = " (or strings naming the classes, with --classnames FILE or a built-in --task)" if strings else ""
    raise CliError(f"label column '{column}' holds {feature}: it must hold integer class ids or a ClassLabel{hint}")


def _ids_from_names(values: Sequence, names: List[str], column: str) -> torch.Tensor:
    """String labels -> their index in ``names``; a label that is not a class name is a :class:`CliError`."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({v for v in values if v not in index}, key=str)
    if unknown:
        raise CliError(f"label column '{column}' holds {len(unknown)} label(s) that are not among the "
                       f"{len(names)} class names, e.g. {unknown[0]!r}")
    return torch.tensor([index[v] for v in values], dtype=torch.long)


def _check_classes(dataset, column: str, names: Optional[List[str]], labels: torch.Tensor) -> List[str]:
    """The class names, checked against the declared number of classes and the range of the labels."""
    if names is None:
        raise CliError(f"no class names: column '{column}' is not a ClassLabel; pass --classnames FILE")
    declared = getattr(dataset.features.get(column), "num_classes", None)
    if declared is not None and len(names) != declared:
        raise CliError(f"{len(names)} class names given but the label column declares {declared} classes")
    if int(labels.max()) >= len(names) or int(labels.min()) < 0:
        raise CliError(f"{len(names)} class names given but the labels range over {int(labels.min())}..{int(labels.max())}")
    return names


def load_tasks(args, resolution: int):
    """(dataset, image column, {task: (labels, classnames, templates)}) of a classification run."""
    split = args.split or "test"
    if Path(args.dataset).is_dir() and args.split is None and not (Path(args.dataset) / "test").is_dir():
        split = "train"  # a plain folder of class subfolders loads as one "train" split
    if args.dataset == "embedded":
        from diffdis.data.embedded import make_embedded_dataset

        dataset = make_embedded_dataset(split, args.num_samples, resolution=resolution)
        names = list(zs.EMBEDDED_TASKS) if args.task == "all" else [args.task]
        if any(n not in zs.EMBEDDED_TASKS for n in names):
            raise CliError(f"unknown embedded task '{args.task}'; choose shape, colour, colour_shape, all or retrieval")
        if len(dataset) == 0:
            raise CliError("the dataset is empty")
        return dataset, "image", {n: (zs.embedded_labels(dataset, n), *zs.load_task(n)) for n in names}
    dataset = _load_hf_dataset(args.dataset, split)
    if args.num_samples is not None:
        dataset = dataset.select(range(min(args.num_samples, len(dataset))))
    _check_column(dataset, args.image_column, "image")
    _check_column(dataset, args.label_column, "label")
    if len(dataset) == 0:
        raise CliError("the dataset is empty")
    names, templates = _classnames_for(dataset, args)
    labels = _label_ids(dataset, args.label_column, names)
    names = _check_classes(dataset, args.label_column, names, labels)
    task = args.task if args.task not in ("auto", "all") else Path(args.dataset).name
    return dataset, args.image_column, {task: (labels, names, templates)}


def pixel_loader(dataset, column: str, resolution: int) -> Callable[[List[int]], torch.Tensor]:
    """Item indices -> pixel values (b, 3, R, R) in [-1, 1] (centre crop)."""
    from diffdis.data.transforms import decode_image, resize_and_crop, to_pixel_values

    def load(indices: List[int]) -> torch.Tensor:
        rows = dataset.select(indices)[column]
        images = [decode_image(v) for v in rows]
        if any(im is None for im in images):
            raise CliError(f"an image of items {indices[0]}..{indices[-1]} cannot be decoded")
        return torch.stack([to_pixel_values(resize_and_crop(im.convert("RGB"), resolution)) for im in images])

    return load


# ---------------------------------------------------------------------------- running
def _diffusion_classifier_logits(model, args, classnames, templates, load, n, accelerator) -> torch.Tensor:
    from diffusers import DDPMScheduler

    device = model.unet.device
    contexts = zs.class_contexts(model.text_encoder, model.tokenizer, classnames, templates[0], device)
    scheduler = DDPMScheduler.from_config(model.scheduler_config)

    def fn(pixels, gens):
        latents = images_to_latents(pixels.to(device), model.vae)
        return zs.diffusion_classifier_logits(model.unet, latents, contexts, scheduler, args.dc_timesteps, gens)

    return zs.compute_image_features(fn, load, n, args.batch_size, args.seed, accelerator, args.progress)


def classify(model, args, tasks: Dict, load, n: int, accelerator) -> Dict[str, Dict]:
    """Metrics per task; DiffDis features are computed once and shared by every task."""
    results, features = {}, None
    for task, (labels, classnames, templates) in tasks.items():
        if args.method == "diffdis":
            if features is None:
                sampler = TextQuerySampler.from_model(model, args.scheduler)
                fn = zs.diffdis_feature_fn(sampler, model.vae, args.steps, args.guidance, args.noise_samples)
                features = zs.compute_image_features(fn, load, n, args.batch_size, args.seed, accelerator, args.progress)
            ensemble = args.ensemble if args.ensemble != "auto" else zs.task_ensemble(task)
            weights = zs.build_zero_shot_classifier(model.text_encoder, model.tokenizer, classnames, templates,
                                                    model.unet.device, ensemble=ensemble)
            metrics = zs.evaluate_zero_shot(features, labels, weights)
        else:
            logits = _diffusion_classifier_logits(model, args, classnames, templates, load, n, accelerator)
            metrics = zs.evaluate_zero_shot(logits, labels)
        results[task] = {"task": "zeroshot_classification", "metrics": metrics, "chance": 1.0 / len(classnames),
                         "ensemble": ensemble if args.method == "diffdis" else None,
                         "num_classes": len(classnames), "classnames": classnames, "templates": templates}
    return results


def retrieval(model, args, resolution: int, accelerator) -> Dict[str, Dict]:
    """Recall@1/5/10 on the embedded validation captions (every phrasing of each image is a caption)."""
    from diffdis.data.embedded import make_embedded_dataset

    if args.dataset != "embedded":
        raise CliError("--task retrieval is available on the embedded dataset only")
    if args.method != "diffdis":
        raise CliError("--task retrieval needs --method diffdis")
    dataset = make_embedded_dataset(args.split or "validation", args.num_samples, resolution=resolution)
    if len(dataset) == 0:
        raise CliError("the dataset is empty")
    sampler = TextQuerySampler.from_model(model, args.scheduler)
    fn = zs.diffdis_feature_fn(sampler, model.vae, args.steps, args.guidance, args.noise_samples)
    load = pixel_loader(dataset, "image", resolution)
    images = zs.compute_image_features(fn, load, len(dataset), args.batch_size, args.seed, accelerator, args.progress)
    captions = dataset["captions"]
    texts = [c for caps in captions for c in caps]
    index = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    text_features = zs.encode_texts(model.text_encoder, model.tokenizer, texts, model.unet.device)
    metrics = zs.retrieval_metrics(images, text_features, index)
    per_image = len(texts) // len(dataset)
    chance = {}
    for k in (1, 5, 10):
        chance[f"image_retrieval_recall@{k}"] = _chance_hit(len(dataset), 1, k)
        chance[f"text_retrieval_recall@{k}"] = _chance_hit(len(texts), per_image, k)
    return {"retrieval": {"task": "zeroshot_retrieval", "metrics": metrics, "chance": chance,
                          "num_images": len(dataset), "num_texts": len(texts)}}


def _chance_hit(total: int, positives: int, k: int) -> float:
    """Probability that k items drawn at random from ``total`` include one of ``positives``."""
    miss = 1.0
    for j in range(min(k, total)):
        miss *= max(0, total - positives - j) / (total - j)
    return 1.0 - miss


def write_results(out: Path, results: Dict, settings: Dict) -> Path:
    """``results.json`` plus ``confusion_<task>.png`` per classification task."""
    out.mkdir(parents=True, exist_ok=True)
    serialisable = {}
    for task, res in results.items():
        res = dict(res, metrics=dict(res["metrics"]))
        cm = res["metrics"].pop("confusion_matrix", None)
        if cm is not None:
            zs.save_confusion_matrix_png(cm, res["classnames"], out / f"confusion_{task}.png")
            res["confusion_matrix"] = cm.tolist()
        serialisable[task] = res
    path = out / "results.json"
    path.write_text(json.dumps({**settings, "results": serialisable}, indent=1) + "\n")
    return path


def print_table(results: Dict) -> None:
    """One line per task: accuracy (or R@1) next to chance."""
    print(f"{'task':<14} {'metric':<28} {'value':>7} {'chance':>7}")
    for task, res in results.items():
        m = res["metrics"]
        if res["task"] == "zeroshot_classification":
            rows = [("acc1", res["chance"]), ("acc5", min(1.0, 5 * res["chance"])), ("mean_per_class_recall", res["chance"])]
        else:
            rows = [(k, res["chance"][k]) for k in m]
        for key, chance in rows:
            if key in m:
                print(f"{task:<14} {key:<28} {m[key]:>7.3f} {chance:>7.3f}")


def _settings(args, model_dir: str, resolution: int, world: int) -> Dict:
    return {"model": model_dir, "dataset": args.dataset, "split": args.split, "task": args.task, "method": args.method,
            "steps": args.steps, "guidance": args.guidance, "noise_samples": args.noise_samples, "scheduler": args.scheduler,
            "ensemble": args.ensemble,
            "dc_timesteps": args.dc_timesteps, "seed": args.seed, "num_samples": args.num_samples,
            "resolution": resolution, "num_processes": world}


def run(args) -> int:
    """Load, evaluate, write; raises :class:`CliError` on bad input."""
    from accelerate import Accelerator

    check_dual_stream_folder(args.model_dir)
    if args.steps < 1 or args.noise_samples < 1 or args.batch_size < 1:
        raise CliError("--steps, --noise-samples and --batch-size must be >= 1")
    accelerator = Accelerator(cpu=(args.device == "cpu") or not torch.cuda.is_available())
    device = args.device or accelerator.device
    model = load_zero_shot_model(args.model_dir, device)
    resolution = model.resolution
    with torch.no_grad():
        if args.task == "retrieval":
            results = retrieval(model, args, resolution, accelerator)
        else:
            dataset, column, tasks = load_tasks(args, resolution)
            results = classify(model, args, tasks, pixel_loader(dataset, column, resolution), len(dataset), accelerator)
    if accelerator.is_main_process:
        path = write_results(Path(args.out), results, _settings(args, str(args.model_dir), resolution, accelerator.num_processes))
        print_table(results)
        print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0, or 2 on bad input with a one-line error)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (CliError, ZeroShotModelError, zs.TemplateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
