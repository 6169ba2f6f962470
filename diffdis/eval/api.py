"""The evaluation API: zero-shot classification, retrieval, generation quality, a whole model, its report.

One function per kind of evaluation; the command-line tools (``diffdis.cli.zeroshot``,
``diffdis.cli.evaluate`` and, through it, the demo) and evaluation during training
(:class:`diffdis.train.evaluation.TrainingEvaluator`) all call them, so a number means the same
everywhere it is printed or logged.

- :func:`zero_shot`: top-1/top-5 accuracy, mean per-class recall and the confusion matrix per task
  (DiffDis text queries, or the diffusion-classifier baseline).
- :func:`retrieval`: recall@1/5/10 both ways between images and their captions.
- :func:`generation_quality`: FID and prompt adherence of generated images (and the sample grid).
- :func:`evaluate_model`: all four on a trained model folder, as ``tools/evaluate.py`` runs them.
- :func:`report`: ``report.md``, ``metrics.json`` and the PNGs of :func:`evaluate_model`'s result.

With an ``accelerator`` every process takes its shard of the images and every process returns the
same numbers (running sums for FID and adherence, gathered features for zero-shot and retrieval);
without one, everything runs in this process.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import compositional
from . import zeroshot as zs
from .fid import FeatureExtractor, inception_extractor, reference_extractor
from .reference import AttributeClassifier, default_cache_dir, load_or_train_reference_classifier
from .report import report
from .suite import SamplingSettings, adherence_grid, evaluate_adherence, evaluate_fid
from .tasks import (
    DatasetImages,
    EvaluationError,
    FidReference,
    Images,
    ZeroShotTask,
    default_dataset,
    load_fid_reference,
    load_retrieval_set,
    load_zero_shot_tasks,
)
from ..pipelines.prior_pipeline import check_not_prior
from ..pipelines.zeroshot import ZeroShotModelError
from ..pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline, load_zero_shot_pipeline, read_zero_shot_index
from ..utils.host import host_record

__all__ = [
    "ADHERENCE_SCORES",
    "applicable",
    "METHODS",
    "PARTS",
    "PRESETS",
    "DatasetImages",
    "EvaluationError",
    "EvaluationOptions",
    "EvaluationSizes",
    "FidReference",
    "SamplingSettings",
    "ZeroShotSettings",
    "ZeroShotTask",
    "default_dataset",
    "evaluate_model",
    "generation_quality",
    "load_fid_reference",
    "load_retrieval_set",
    "load_zero_shot_tasks",
    "preset_sizes",
    "report",
    "resolved_settings",
    "retrieval",
    "zero_shot",
]

METHODS = ("diffdis", "diffusion_classifier")  # zero-shot classifiers ("auto": the one the training method provides)
PARTS = ("fid", "adherence", "zeroshot", "retrieval", "compositional")  # compositional: only for models trained on that data
ADHERENCE_SCORES = ("shape", "colour", "both", "colour_pixel", "colour_agreement")  # the adherence/* metrics reported
REFERENCE_RESOLUTION = 16  # input size of the reference attribute classifier (images are resized to it)


@dataclass
class ZeroShotSettings:
    """How zero-shot features are computed (written into every result). ``None`` takes the value saved in the
    model's zero-shot pipeline config."""

    method: str = "auto"  # "diffdis" (text queries of the discrimination stream), "diffusion_classifier" (Li et al. 2023), or "auto": the one the model's training method provides
    steps: Optional[int] = None  # K denoising steps of the text query
    guidance: Optional[float] = None  # w: (1+w)Φ(e,t,z) − wΦ(e,t,∅)
    noise_samples: Optional[int] = None  # noise samples averaged per image
    scheduler: Optional[str] = None  # text-query sampler
    ensemble: str = "auto"  # template pooling: "mean", "max", or "auto" (the built-in task's choice)
    dc_timesteps: int = 10  # diffusion classifier: timesteps per class
    dc_keep: Optional[int] = None  # diffusion classifier: classes per image kept after the first round (None: all)
    dc_first_timesteps: int = 2  # diffusion classifier with dc_keep: timesteps of the first round, on every class
    seed: int = 0  # seed of the per-image noise
    batch_size: int = 32  # images per batch and process


@dataclass
class EvaluationSizes:
    """Set sizes of :func:`evaluate_model` (0 skips a part)."""

    fid_images: int  # generated (and real) images for FID
    adherence_per_combo: int  # images per shape x colour prompt (36 prompts)
    zeroshot_samples: int  # embedded test images classified zero-shot
    retrieval_samples: int  # embedded validation images for retrieval
    compositional_samples: int = 0  # test images per compositional task (models trained on data.name=compositional)


PRESETS: Mapping[str, Tuple[int, int, int, int, int]] = {  # the five sizes of EvaluationSizes, in its order
    "full": (1000, 4, 1000, 500, 480),
    "quick": (500, 2, 600, 200, 240),
    "coco30k": (30000, 0, 0, 0, 0),
}
# classes per image the quick preset's diffusion classifier keeps after its first round (2 of 10 timesteps): on a
# gen_only model, 2.6x faster than every class at every timestep and within 0.01 on every compositional task
# (docs/EXPERIMENTS.md §15)
QUICK_DC_KEEP = 5


def preset_sizes(
    preset: str = "full",
    fid_images: Optional[int] = None,
    adherence_per_combo: Optional[int] = None,
    zeroshot_samples: Optional[int] = None,
    retrieval_samples: Optional[int] = None,
    compositional_samples: Optional[int] = None,
) -> EvaluationSizes:
    """A preset's set sizes (:data:`PRESETS`), each size that is given (not None) replacing the preset's.

    Raises:
        EvaluationError: an unknown preset or a negative size.
    """
    if preset not in PRESETS:
        raise EvaluationError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = (fid_images, adherence_per_combo, zeroshot_samples, retrieval_samples, compositional_samples)
    sizes = EvaluationSizes(*(c if c is not None else d for c, d in zip(chosen, PRESETS[preset])))
    if min(asdict(sizes).values()) < 0:
        raise EvaluationError("set sizes must be >= 0")
    return sizes


@dataclass
class EvaluationOptions:
    """Everything :func:`evaluate_model` needs besides the model folder."""

    sizes: EvaluationSizes = field(default_factory=preset_sizes)
    parts: Sequence[str] = PARTS  # which of PARTS to run
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(steps=25, guidance=3.0, batch_size=64))
    zeroshot: ZeroShotSettings = field(default_factory=lambda: ZeroShotSettings(batch_size=64))
    extractor: str = "reference"  # FID features: "reference" (the reference classifier) or "inception"
    inception_weights: Optional[str] = None  # local Inception weights file (extractor="inception")
    fid_reference: Optional[str] = None  # imagefolder with metadata.jsonl; None: the embedded test split
    reference_steps: int = 800  # training steps of the reference classifier when it is not cached yet
    device: Optional[str] = None  # None: the accelerator's device (or cuda when present)
    progress: bool = False  # progress bars


# ---------------------------------------------------------------------------- zero-shot and retrieval
def _features(model: DiffDisZeroShotPipeline, images: Images, settings: ZeroShotSettings, accelerator, progress: bool) -> torch.Tensor:
    """Normalised image features (N, d) of every image, sharded over processes and gathered."""

    def fn(pixels, gens):
        return model.encode_images(pixels, gens, settings.steps, settings.guidance, settings.noise_samples, settings.scheduler)

    return zs.compute_image_features(fn, lambda idx: images[idx], len(images), settings.batch_size, settings.seed,
                                     accelerator, progress)


def _diffusion_classifier_logits(model: DiffDisZeroShotPipeline, task: ZeroShotTask, images: Images,
                                 settings: ZeroShotSettings, accelerator, progress: bool) -> torch.Tensor:
    """(N, C) logits of the diffusion classifier: one prompt per class, the task's first template."""
    prompts = [task.templates[0].format(c) for c in task.classnames]

    def fn(pixels, gens):
        return model.diffusion_classifier_logits(pixels, prompts, gens, settings.dc_timesteps, settings.dc_keep,
                                                 settings.dc_first_timesteps)

    return zs.compute_image_features(fn, lambda idx: images[idx], len(images), settings.batch_size, settings.seed,
                                     accelerator, progress)


def resolved_settings(settings: ZeroShotSettings, model) -> ZeroShotSettings:
    """``settings`` with ``method="auto"`` replaced by the classifier the model provides, and the pipeline's
    saved K, w, n and sampler filled in where ``settings`` leaves them None (so results record what ran)."""
    cfg = model.config
    if settings.method == "auto":
        settings = replace(settings, method="diffdis" if model.discriminates else "diffusion_classifier")
    if settings.method not in METHODS:
        raise EvaluationError(f"unknown zero-shot method {settings.method!r}; choose one of auto, {', '.join(METHODS)}")
    if settings.method == "diffdis" and not model.discriminates:
        raise EvaluationError(f"the model (method {cfg.method!r}) has no trained text stream: use --method "
                              "diffusion_classifier or auto")
    saved = dict(cfg)  # a CLIP pipeline has no K, w, n or sampler: they stay None
    return replace(
        settings,
        steps=settings.steps if settings.steps is not None else saved.get("num_inference_steps"),
        guidance=settings.guidance if settings.guidance is not None else saved.get("guidance_scale"),
        noise_samples=settings.noise_samples if settings.noise_samples is not None else saved.get("num_noise_samples"),
        scheduler=settings.scheduler or saved.get("text_scheduler"),
    )


def zero_shot(
    model: DiffDisZeroShotPipeline,
    tasks: Mapping[str, ZeroShotTask],
    images: Images,
    settings: Optional[ZeroShotSettings] = None,
    accelerator=None,
    progress: bool = False,
) -> Dict[str, Dict]:
    """Zero-shot classification of ``images`` on every task; DiffDis features are computed once and shared by the tasks.

    Args:
        model: the trained model's zero-shot pipeline (:func:`~diffdis.pipelines.zeroshot_pipeline.load_zero_shot_pipeline`,
            or a :class:`~diffdis.pipelines.zeroshot_pipeline.DiffDisZeroShotPipeline` around live modules).
        tasks: ``{name: ZeroShotTask(labels (N,), classnames, templates)}``, labels in the order of ``images``.
        images: pixel values (N, 3, R, R) in [-1, 1], or a :class:`DatasetImages`.
        settings: method, steps, guidance, seed, batch size.
        accelerator: shards the images over processes (None: this process does all).
        progress: show a progress bar.

    Returns:
        ``{task: {"task": "zeroshot_classification", "metrics": {acc1, acc5 (5+ classes),
        mean_per_class_recall, num_samples, confusion_matrix}, "chance", "ensemble", "num_classes",
        "classnames", "templates"}}``.
    """
    settings = resolved_settings(settings or ZeroShotSettings(), model)
    results, features = {}, None
    for name, task in tasks.items():
        ensemble = None
        if settings.method == "diffdis":
            if features is None:
                features = _features(model, images, settings, accelerator, progress)
            ensemble = settings.ensemble if settings.ensemble != "auto" else zs.task_ensemble(name)
            weights = zs.build_zero_shot_classifier(model.encode_text, task.classnames, task.templates,
                                                    ensemble=ensemble)  # (d, C) or (d, C, T)
            logits = zs.class_logits(features, weights)  # (N, C)
        else:
            logits = _diffusion_classifier_logits(model, task, images, settings, accelerator, progress)  # (N, C)
        metrics = zs.evaluate_zero_shot(logits, task.labels)
        metrics.update(compositional.task_metrics(name, logits, task.labels))  # relation: pair accuracy
        results[name] = {"task": "zeroshot_classification", "metrics": metrics, "chance": 1.0 / len(task.classnames),
                         "ensemble": ensemble, "num_classes": len(task.classnames), "classnames": task.classnames,
                         "templates": task.templates}
    return results


def _chance_hit(total: int, positives: int, k: int) -> float:
    """Probability that k items drawn at random from ``total`` include one of ``positives``."""
    miss = 1.0
    for j in range(min(k, total)):
        miss *= max(0, total - positives - j) / (total - j)
    return 1.0 - miss


@torch.no_grad()
def retrieval(
    model: DiffDisZeroShotPipeline,
    images: Images,
    captions: Sequence[Sequence[str]],
    settings: Optional[ZeroShotSettings] = None,
    accelerator=None,
    progress: bool = False,
    name: str = "retrieval",
) -> Dict[str, Dict]:
    """Recall@1/5/10 between ``images`` and their captions, both ways (every caption of an image is a hit).

    Args:
        model: the trained model.
        images: pixel values (N, 3, R, R) in [-1, 1], or a :class:`DatasetImages`.
        captions: ``captions[i]`` lists image i's captions (:func:`~diffdis.eval.tasks.load_retrieval_set`), e.g.
            the five of a COCO image: a text query's one positive is its image; an image query is a hit when any
            of its captions is in the top k (CLIP_benchmark's rule).
        settings: the DiffDis feature settings (``method`` must be ``"diffdis"``).
        accelerator, progress: as in :func:`zero_shot`.
        name: the key of the result.

    Returns:
        ``{name: {"task": "zeroshot_retrieval", "metrics": {image_retrieval_recall@k,
        text_retrieval_recall@k}, "chance": {same keys}, "num_images", "num_texts"}}``.
    """
    settings = resolved_settings(settings or ZeroShotSettings(), model)
    if settings.method != "diffdis":
        raise EvaluationError("retrieval needs image and text features (--method diffdis); the diffusion classifier "
                              "has none")
    if len(captions) != len(images):
        raise EvaluationError(f"{len(captions)} caption lists for {len(images)} images")
    image_features = _features(model, images, settings, accelerator, progress)  # (N, d_e)
    texts = [c for caps in captions for c in caps]
    index = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])  # (N_txt,)
    text_features = model.encode_text(texts)  # (N_txt, d)
    metrics = zs.retrieval_metrics(image_features, text_features, index)
    per_image = len(texts) // len(images)
    chance = {}
    for k in (1, 5, 10):
        chance[f"image_retrieval_recall@{k}"] = _chance_hit(len(images), 1, k)
        chance[f"text_retrieval_recall@{k}"] = _chance_hit(len(texts), per_image, k)
    return {name: {"task": "zeroshot_retrieval", "metrics": metrics, "chance": chance,
                   "num_images": len(images), "num_texts": len(texts)}}


# ---------------------------------------------------------------------------- generation quality
def generation_quality(
    pipe,
    settings: Optional[SamplingSettings] = None,
    *,
    classifier: Optional[AttributeClassifier] = None,
    adherence_per_combo: int = 0,
    fid_reference: Optional[FidReference] = None,
    extractor: Optional[FeatureExtractor] = None,
    stats_cache: Optional[Union[str, Path]] = None,
    accelerator=None,
    progress: bool = False,
) -> Dict[str, Any]:
    """FID and prompt adherence of images generated by ``pipe`` (either part is skipped when not asked for).

    Args:
        pipe: a ``DiffDisPipeline`` (images i uses seed ``settings.seed + i``).
        settings: sampler, steps, guidance, seed, batch size.
        classifier: the reference attribute classifier: scores adherence, and gives FID features
            when no ``extractor`` is given.
        adherence_per_combo: images per "a {colour} {shape}" prompt; 0 skips adherence and the grid.
        fid_reference: the captions and real images of FID (:func:`~diffdis.eval.tasks.load_fid_reference`);
            None skips FID.
        extractor: FID feature space (default: the reference classifier's features).
        stats_cache: folder caching the real images' FID statistics.
        accelerator, progress: shard the generation over processes; show progress bars.

    Returns:
        ``metrics`` (flat: ``fid``, ``adherence/{shape,colour,both,colour_pixel,colour_agreement}``),
        ``fid`` (the FID report with its settings) and ``adherence`` (every adherence metric), each
        None when skipped, ``grid`` (one captioned image per shape x colour, or None) and ``timings_s``.
    """
    settings = settings or SamplingSettings()
    out: Dict[str, Any] = {"metrics": {}, "fid": None, "adherence": None, "grid": None, "timings_s": {}}
    if fid_reference is not None:
        if extractor is None and classifier is None:
            raise ValueError("FID needs a feature extractor or the reference classifier")
        t = time.perf_counter()
        extractor = extractor or reference_extractor(classifier)
        captions, real, name = fid_reference
        out["fid"] = evaluate_fid(pipe, captions, real, extractor, name, settings, stats_cache, accelerator, progress)
        out["metrics"]["fid"] = out["fid"]["fid"]
        out["timings_s"]["fid"] = time.perf_counter() - t
    if adherence_per_combo > 0:
        if classifier is None:
            raise ValueError("prompt adherence needs the reference classifier")
        t = time.perf_counter()
        metrics, images, prompts = evaluate_adherence(pipe, classifier, adherence_per_combo, settings, accelerator, progress)
        out["adherence"] = metrics
        out["metrics"].update({f"adherence/{k}": metrics[f"adherence/{k}"] for k in ADHERENCE_SCORES})
        out["grid"] = adherence_grid(images, prompts)  # images: (36, 3, H, W) uint8, one per combination
        out["timings_s"]["adherence"] = time.perf_counter() - t
    return out


# ---------------------------------------------------------------------------- a whole model
def _extractor(options: EvaluationOptions, classifier: Optional[AttributeClassifier]) -> FeatureExtractor:
    if options.extractor == "inception":
        if not options.inception_weights:
            raise EvaluationError("extractor 'inception' needs a local Inception weights file (nothing can be downloaded)")
        try:
            return inception_extractor(options.inception_weights)
        except (FileNotFoundError, ModuleNotFoundError) as err:
            raise EvaluationError(str(err)) from None
    if options.extractor != "reference":
        raise EvaluationError(f"unknown FID extractor {options.extractor!r}; choose reference or inception")
    return reference_extractor(classifier)


def _zero_shot_parts(model_dir, options: EvaluationOptions, parts: Sequence[str], device, accelerator) -> Dict[str, Dict]:
    """Zero-shot classification on every embedded task (test split) and retrieval (validation split)."""
    sizes = options.sizes
    try:
        model = load_zero_shot_pipeline(model_dir, device)
    except ZeroShotModelError as err:
        raise EvaluationError(str(err)) from None
    results: Dict[str, Dict] = {}
    if "zeroshot" in parts and sizes.zeroshot_samples > 0:
        images, tasks = load_zero_shot_tasks("embedded", "all", num_samples=sizes.zeroshot_samples, resolution=model.resolution)
        results.update(zero_shot(model, tasks, images, options.zeroshot, accelerator, options.progress))
    if "retrieval" in parts and sizes.retrieval_samples > 0:
        images, captions = load_retrieval_set("validation", sizes.retrieval_samples, model.resolution)
        results.update(retrieval(model, images, captions, options.zeroshot, accelerator, options.progress))
    if "compositional" in parts and sizes.compositional_samples > 0:
        for name in compositional.COMPOSITIONAL_TASKS:  # each task on its own test images
            images, tasks = load_zero_shot_tasks("compositional", name, num_samples=sizes.compositional_samples,
                                                 resolution=model.resolution)
            results.update(zero_shot(model, tasks, images, options.zeroshot, accelerator, options.progress))
    return results


def applicable(model_dir: Union[str, Path]) -> Dict[str, Any]:
    """What a trained model folder can be scored on, from its saved zero-shot pipeline config (no weights loaded).

    Returns ``method`` (the training method), ``generates`` (FID and prompt adherence apply), ``discriminates``
    (text-query zero-shot and retrieval apply), ``classifier`` (the zero-shot classifier that applies:
    ``diffdis`` or ``diffusion_classifier``) and ``trained_on`` (the run's ``data.name``: the compositional tasks
    apply to models trained on ``compositional``, whose held-out combinations they never saw).

    Raises:
        EvaluationError: the folder has no zero-shot pipeline index (a prior's folder says so).
    """
    index = read_zero_shot_index(model_dir)
    if not index:
        try:
            check_not_prior(model_dir)
        except ZeroShotModelError as err:
            raise EvaluationError(str(err)) from None
        raise EvaluationError(f"'{model_dir}' has no zeroshot_index.json: not a diffdis model folder, or one written by a "
                              "diffdis from before zero-shot pipelines were saved (train it again)")
    discriminates = index.get("classifier", "text_query") == "text_query"
    return {"method": index.get("method", "diffdis"), "generates": bool(index.get("generates", True)),
            "discriminates": discriminates, "classifier": "diffdis" if discriminates else "diffusion_classifier",
            "trained_on": _training_data(model_dir)}


def _training_data(model_dir: Union[str, Path]) -> Optional[str]:
    """``data.name`` of the run that wrote the folder, from its record ``diffdis_config.yaml`` (None without one)."""
    import yaml

    record = Path(model_dir) / "diffdis_config.yaml"
    try:
        data = (yaml.safe_load(record.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return data.get("name") if isinstance(data, dict) else None


def _generation_parts(model_dir, options: EvaluationOptions, parts: Sequence[str], device: str, accelerator) -> Dict[str, Any]:
    """FID and prompt adherence of the model's text-to-image pipeline (with the reference classifier)."""
    from ..pipelines.text_to_image import load_pipeline

    sizes = options.sizes
    try:
        pipe = load_pipeline(model_dir, options.sampling.scheduler, device, "float32")
    except (ValueError, OSError) as err:
        raise EvaluationError(str(err).splitlines()[0]) from None
    height, _ = pipe.default_size()
    timings: Dict[str, float] = {}
    classifier = None
    if ("fid" in parts and options.extractor == "reference") or ("adherence" in parts and sizes.adherence_per_combo > 0):
        t = time.perf_counter()
        classifier = load_or_train_reference_classifier(resolution=REFERENCE_RESOLUTION, steps=options.reference_steps)
        timings["reference_classifier"] = time.perf_counter() - t
    fid_set, extractor = None, None
    if "fid" in parts and sizes.fid_images > 0:
        fid_set = load_fid_reference(options.fid_reference, sizes.fid_images, height)
        extractor = _extractor(options, classifier)
    quality = generation_quality(
        pipe, options.sampling, classifier=classifier,
        adherence_per_combo=sizes.adherence_per_combo if "adherence" in parts else 0,
        fid_reference=fid_set, extractor=extractor, stats_cache=default_cache_dir() / "fid_stats",
        accelerator=accelerator, progress=options.progress,
    )
    return {"fid": quality["fid"], "adherence": quality["adherence"], "grid": quality["grid"],
            "metrics": dict(quality["metrics"]), "timings_s": {**timings, **quality["timings_s"]}}


def evaluate_model(model_dir: Union[str, Path], options: Optional[EvaluationOptions] = None, accelerator=None) -> Dict[str, Any]:
    """Evaluate a trained model folder: FID, prompt adherence, zero-shot accuracy on every embedded task, retrieval,
    and zero-shot accuracy on the compositional tasks when the model was trained on that data.

    Args:
        model_dir: a trained model folder (``<output_dir>/model``).
        options: set sizes, parts, sampling and zero-shot settings, FID features and reference set.
        accelerator: shards every part over processes (None: one process).

    Returns:
        What :func:`report` writes: ``metrics`` (flat), ``fid``, ``adherence``, ``zeroshot`` (``{task:
        result}``), ``grid``, ``timings_s``, ``sizes``, ``model``, ``options``, ``is_main``, ``num_processes`` and
        ``machine`` (:func:`~diffdis.utils.host.host_record`).

    Raises:
        EvaluationError: a folder that is not a model, a bad reference set or Inception weights file.
    """
    from dataclasses import asdict

    options = options or EvaluationOptions()
    unknown = [p for p in options.parts if p not in PARTS]
    if unknown:
        raise EvaluationError(f"unknown evaluation part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    scope = applicable(model_dir)
    parts, sizes = [p for p in PARTS if p in options.parts], options.sizes
    if not scope["generates"]:  # a discrimination-only model: its generation head was never trained
        parts = [p for p in parts if p not in ("fid", "adherence")]
    if not scope["discriminates"]:  # no text stream: zero-shot by the diffusion classifier, no retrieval
        parts = [p for p in parts if p != "retrieval"]
    if scope["trained_on"] != "compositional":  # its "held-out" combinations were in the training data
        parts = [p for p in parts if p != "compositional"]
    default = accelerator.device if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    device = options.device or str(default)
    out: Dict[str, Any] = {"metrics": {}, "fid": None, "adherence": None, "zeroshot": {}, "grid": None, "timings_s": {}}
    if "fid" in parts or "adherence" in parts:
        out.update(_generation_parts(model_dir, options, parts, device, accelerator))
    if any(p in parts for p in ("zeroshot", "retrieval", "compositional")):
        t = time.perf_counter()
        out["zeroshot"] = _zero_shot_parts(model_dir, options, parts, options.device or default, accelerator)
        for task, res in out["zeroshot"].items():
            for key, value in res["metrics"].items():
                if key != "confusion_matrix":
                    out["metrics"][f"{task}/{key}"] = value
        out["timings_s"]["zeroshot_and_retrieval"] = time.perf_counter() - t
    out["sizes"] = asdict(sizes)
    out["model"] = str(model_dir)
    out["method"] = scope["method"]
    out["parts"] = parts
    out["options"] = options
    out["is_main"] = accelerator.is_main_process if accelerator is not None else True
    out["num_processes"] = accelerator.num_processes if accelerator is not None else 1
    out["machine"] = host_record(device)
    return out
