"""Evaluation during training: a sample grid, prompt adherence, zero-shot accuracy and retrieval.

Every ``train.eval_every`` steps the trainer calls a :class:`TrainingEvaluator` on **all** processes:
image generation (:func:`diffdis.eval.api.generation_quality` and :func:`diffdis.eval.suite.generate_images`,
whose counts are summed over processes; only the grid's images are gathered) and feature extraction
(:func:`diffdis.eval.api.zero_shot` and :func:`diffdis.eval.api.retrieval`, features gathered) are sharded
across processes, so every process returns the same metrics and no process idles while rank 0 works. These are
the functions ``tools/evaluate.py`` and ``tools/zeroshot.py`` report with, so the numbers logged here are those
tools' numbers for the same settings.

What is scored depends on the run's data and method (:func:`evaluation_plan`):

* **the sample grid**: ``train.validation_prompts`` when given; else the shapes x colours grid of prompt adherence
  on the procedural data, or the first ``train.eval_grid_size`` validation captions on any other data;
* **prompt adherence**: procedural data only (the reference classifier knows only their shapes and colours);
* **zero-shot accuracy**: ``train.eval_zeroshot.dataset`` (any labelled dataset, read as ``tools/zeroshot.py
  --dataset`` reads it) or, on the procedural data, the embedded shape/colour tasks;
* **retrieval**: R@1/5/10 both ways on ``train.eval_retrieval_samples`` validation images and their captions.

Streams a method does not train are not scored (no zero-shot or retrieval without a trained discrimination stream,
no grid without generation). Settings that cannot work (an unreadable prompts file, retrieval without a validation
split) are a :class:`~diffdis.config.ConfigError` at start-up (:func:`diffdis.config.check_evaluation_data`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from .. import methods
from ..config import PROCEDURAL_DATA, ConfigError, check_evaluation_data, validation_prompts
from ..data.embedded import make_embedded_dataset
from ..data.transforms import decode_image, to_pixel_values
from ..eval.api import (
    DatasetImages,
    EvaluationError,
    Images,
    ZeroShotSettings,
    ZeroShotTask,
    generation_quality,
    load_retrieval_set,
    load_zero_shot_tasks,
    retrieval,
    zero_shot,
)
from ..eval.reference import AttributeClassifier, load_or_train_reference_classifier
from ..eval.suite import SamplingSettings, generate_images, to_pil
from ..eval.zeroshot import EMBEDDED_TASKS, embedded_labels, load_task
from ..pipelines import make_scheduler
from ..utils.images import make_grid

logger = logging.getLogger("diffdis.train")

REFERENCE_RESOLUTION = 16  # the reference classifier's input size (generated images are resized to it)
ADHERENCE_KEYS = ("shape", "colour", "both", "colour_pixel")


@dataclass(frozen=True)
class EvaluationPlan:
    """What a run's evaluation during training scores (0 / None: that part is off)."""

    adherence_per_combo: int  # images per shape x colour prompt (procedural data, a generating method)
    grid_prompts: Optional[Tuple[str, ...]]  # the sample grid's prompts (None: the adherence grid, or no grid)
    zeroshot_samples: int  # images classified zero-shot
    retrieval_samples: int  # validation images for retrieval


def evaluation_plan(cfg, first_captions=None) -> EvaluationPlan:
    """The parts of a run's evaluation during training, from its data, method and ``train.eval_*`` keys (see the
    module docstring). ``first_captions(n)`` gives the first validation captions (default: read from the run's
    data) when the grid needs them."""
    method, t = methods.get(cfg.method), cfg.train
    generates, discriminates = method.trains_generation(cfg.loss), method.trains_discrimination(cfg.loss)
    procedural = cfg.data.name in PROCEDURAL_DATA
    adherence = t.eval_adherence_per_combo if generates and procedural else 0
    prompts = validation_prompts(cfg) if generates else None
    if generates and prompts is None and not procedural and t.eval_grid_size > 0:
        prompts = (first_captions or (lambda n: validation_captions(cfg, n)))(t.eval_grid_size)
    zeroshot = t.eval_zeroshot_samples if discriminates and (procedural or t.eval_zeroshot.dataset) else 0
    return EvaluationPlan(adherence, tuple(prompts) if prompts else None, zeroshot,
                          t.eval_retrieval_samples if discriminates else 0)


def _validation_rows(cfg, n: int, check_images: bool = True) -> List[dict]:
    """The first ``n`` usable rows (non-empty caption; with ``check_images``, a decodable image) of the validation
    split (the train split when there is none), each ``{"image", "caption", "captions"}``."""
    from .build import load_split

    split = cfg.data.validation_split or "train"
    rows = []
    for row in itertools.islice(iter(load_split(cfg.data, split, num_samples=None if cfg.data.streaming else 4 * n)), 4 * n):
        caption = row["caption"] if isinstance(row["caption"], str) else next(iter(row["caption"] or []), "")
        if caption.strip() and (not check_images or decode_image(row["image"]) is not None):
            rows.append({"image": row["image"], "caption": caption.strip(), "captions": row["caption"]})
        if len(rows) == n:
            break
    return rows


def validation_captions(cfg, n: int) -> List[str]:
    """The first ``n`` distinct captions of the run's validation split (train split without one)."""
    seen: List[str] = []
    for row in _validation_rows(cfg, 4 * n, check_images=False):  # captions only: no image is decoded
        if row["caption"] not in seen:
            seen.append(row["caption"])
        if len(seen) == n:
            break
    if not seen:
        raise ConfigError(f"no usable caption in the first rows of data split {cfg.data.validation_split or 'train'!r}"
                          " for the evaluation grid; set train.validation_prompts")
    return seen


def retrieval_set(cfg, n: int) -> Tuple[Images, List[List[str]]]:
    """``n`` validation images and their captions: the embedded set (every phrasing) on the procedural data, else
    the run's validation split (a list-valued caption column gives several captions per image)."""
    import datasets

    if cfg.data.name in PROCEDURAL_DATA:
        return load_retrieval_set("validation", n, cfg.data.resolution)
    rows = _validation_rows(cfg, n)
    if not rows:
        raise ConfigError(f"no usable image-caption pair in data split {cfg.data.validation_split!r} for retrieval")
    captions = [[c] if isinstance(c, str) else [x for x in c if isinstance(x, str) and x.strip()] for c in
                (r["captions"] for r in rows)]
    table = datasets.Dataset.from_dict({"image": [r["image"] for r in rows]}, features=datasets.Features({"image": datasets.Image()}))
    return DatasetImages(table, "image", cfg.data.resolution), captions


def embedded_test_subset(num: int, resolution: int, seed: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The first ``num`` embedded test images as pixels (N, 3, R, R) in [-1, 1] and labels (N,) per task."""
    dataset = make_embedded_dataset("test", num, resolution=resolution, seed=seed)
    pixels = torch.stack([to_pixel_values(im) for im in dataset["image"]])  # (N, 3, R, R)
    return pixels, {task: embedded_labels(dataset, task) for task in EMBEDDED_TASKS}


def zero_shot_set(cfg, n: int) -> Tuple[Images, Dict[str, ZeroShotTask]]:
    """The images and tasks of zero-shot accuracy during training: ``train.eval_zeroshot.dataset``'s, else the
    embedded shape/colour tasks on the first ``n`` embedded test images."""
    z = cfg.train.eval_zeroshot
    if not z.dataset:
        pixels, labels = embedded_test_subset(n, cfg.data.resolution, cfg.data.seed)
        return pixels, {task: ZeroShotTask(labels[task], *load_task(task)) for task in EMBEDDED_TASKS}
    try:
        return load_zero_shot_tasks(z.dataset, z.task, z.split, n, cfg.data.resolution, z.image_column, z.label_column,
                                    z.classnames, z.templates)
    except (EvaluationError, OSError, ValueError) as err:
        raise ConfigError(f"train.eval_zeroshot.dataset '{z.dataset}': {str(err).splitlines()[0]}") from None


@contextlib.contextmanager
def eval_mode(modules: Sequence[Optional[torch.nn.Module]]) -> Iterator[None]:
    """Put ``modules`` in eval mode, then give every submodule back the mode it had (None entries are skipped)."""
    present = [sub for m in modules if m is not None for sub in m.modules()]
    was_training = [m.training for m in present]
    for m in present:
        m.training = False
    try:
        yield
    finally:
        for m, mode in zip(present, was_training):
            m.training = mode


class TrainingEvaluator:
    """The sample grid, prompt adherence, zero-shot accuracy and retrieval of the live model.

    Built once before the training loop (:meth:`from_config`) with everything that does not change during training:
    the plan, the grid prompts, the zero-shot images and tasks, the retrieval set and the reference classifier.
    Calling it evaluates the modules as they are (the trainer swaps the EMA weights in first).

    Args:
        cfg: the run config: sampler settings are its ``train.eval_*`` keys, the noise seed ``train.seed``.
        plan: what to score (:func:`evaluation_plan`).
        classifier: the reference attribute classifier (needed when adherence is on).
        zero_shot_data: ``(images, {task: ZeroShotTask})`` (needed when zero-shot is on).
        retrieval_data: ``(images, captions per image)`` (needed when retrieval is on).
    """

    def __init__(self, cfg, plan: EvaluationPlan, classifier: Optional[AttributeClassifier] = None,
                 zero_shot_data: Optional[Tuple[Images, Dict[str, ZeroShotTask]]] = None,
                 retrieval_data: Optional[Tuple[Images, List[List[str]]]] = None):
        if plan.adherence_per_combo > 0 and classifier is None:
            raise ValueError("prompt adherence needs the reference classifier")
        if plan.zeroshot_samples > 0 and zero_shot_data is None:
            raise ValueError("zero-shot accuracy needs its images and tasks")
        if plan.retrieval_samples > 0 and retrieval_data is None:
            raise ValueError("retrieval needs its images and captions")
        self.cfg, self.plan, self.classifier = cfg, plan, classifier
        self.zero_shot_data, self.retrieval_data = zero_shot_data, retrieval_data

    @classmethod
    def from_config(cls, cfg, accelerator=None, classifier: Optional[AttributeClassifier] = None) -> "TrainingEvaluator":
        """Build from a run config (call on every process, inside ``accelerator.main_process_first()``).

        The reference classifier is loaded from its disk cache (trained and cached on a miss), so the
        main process must go first: the others then find it cached instead of training it too.

        Raises:
            ConfigError: evaluation settings that cannot work (see :func:`diffdis.config.check_evaluation_data`), a
                zero-shot dataset that does not load, or no usable validation caption.
        """
        check_evaluation_data(cfg)
        plan = evaluation_plan(cfg)
        device = accelerator.device if accelerator is not None else "cpu"
        if classifier is None and plan.adherence_per_combo > 0:
            classifier = load_or_train_reference_classifier(resolution=REFERENCE_RESOLUTION, device=device)
        if classifier is not None:
            classifier = classifier.to(device).eval()
        zero_shot_data = zero_shot_set(cfg, plan.zeroshot_samples) if plan.zeroshot_samples > 0 else None
        retrieval_data = retrieval_set(cfg, plan.retrieval_samples) if plan.retrieval_samples > 0 else None
        parts = [f"grid of {len(plan.grid_prompts)} prompts"] if plan.grid_prompts else []
        parts += [f"adherence ({plan.adherence_per_combo} per combination)"] if plan.adherence_per_combo else []
        parts += [f"zero-shot on {', '.join(zero_shot_data[1])}"] if zero_shot_data else []
        parts += [f"retrieval on {len(retrieval_data[1])} images"] if retrieval_data else []
        logger.info("evaluation every %d steps: %s", cfg.train.eval_every, "; ".join(parts) or "nothing applies to this run")
        evaluator = cls(cfg, plan, classifier, zero_shot_data, retrieval_data)
        unknown = sorted(set(cfg.train.stop_at or {}) - set(evaluator.metric_names()))
        if unknown:
            raise ConfigError(f"train.stop_at names {', '.join(unknown)}, which this run's evaluation does not give; it gives: "
                              f"{', '.join(evaluator.metric_names()) or 'nothing'}")
        return evaluator

    def metric_names(self) -> List[str]:
        """The names (without ``eval/``) of the figures each evaluation gives, as ``train.stop_at`` takes them."""
        names = [f"adherence_{k}" for k in ADHERENCE_KEYS] if self.plan.adherence_per_combo > 0 else []
        names += [f"zeroshot_{task}" for task in self.zero_shot_data[1]] if self.zero_shot_data is not None else []
        if self.retrieval_data is not None:
            names += [f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in (1, 5, 10)]
        return names

    def reached(self, metrics: Dict[str, float]) -> bool:
        """True when ``metrics`` (one evaluation's) meet every target of ``train.stop_at`` (False without targets)."""
        targets = self.cfg.train.stop_at or {}
        return bool(targets) and all(metrics.get(f"eval/{k}", float("-inf")) >= v for k, v in targets.items())

    @torch.no_grad()
    def __call__(self, accelerator, method: methods.Method, components, step: Optional[int] = None
                 ) -> Tuple[Dict[str, float], Optional[Image.Image]]:
        """Evaluate on every process (each takes its shard); every process returns the same results.

        Args:
            accelerator: an ``accelerate.Accelerator`` (None: one process, on the UNet's device).
            method: the unwrapped training method (its live modules are evaluated through its pipelines).
            components: the run's components (tokenizer, noise scheduler, VAE).
            step: the global step, for the log only.

        Returns:
            ``(metrics, grid)``: ``eval/adherence_{shape,colour,both,colour_pixel}`` (adherence on),
            ``eval/zeroshot_<task>`` (top-1, zero-shot on), ``eval/image_retrieval_recall@k`` and
            ``eval/text_retrieval_recall@k`` (retrieval on) and ``eval/seconds``; the captioned sample grid as a PIL
            image, or None without one.
        """
        start = time.perf_counter()
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        metrics: Dict[str, float] = {}
        grid = None
        # fixed per-image generators drive all sampling; fork_rng keeps the training RNG untouched regardless
        device = next(method.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with eval_mode([method, components.vae]), torch.random.fork_rng(devices=devices), autocast:
            if self.plan.adherence_per_combo > 0:
                adherence, grid = self._adherence(accelerator, method, components)
                metrics.update(adherence)
            if self.plan.grid_prompts:
                grid = self._prompt_grid(accelerator, method, components)
            if self.plan.zeroshot_samples > 0 or self.plan.retrieval_samples > 0:
                metrics.update(self._features(accelerator, method, components))
        metrics["eval/seconds"] = time.perf_counter() - start
        logger.debug(f"evaluation at step {step} took {metrics['eval/seconds']:.1f} s")
        return metrics, grid

    def _sampling(self) -> SamplingSettings:
        t = self.cfg.train
        return SamplingSettings(steps=t.eval_steps, guidance=t.eval_guidance, scheduler="ddim", seed=t.seed,
                                batch_size=t.eval_batch_size)

    def _pipeline(self, method: methods.Method, components):
        pipe = method.text_to_image_pipeline(components, make_scheduler("ddim", components.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _adherence(self, accelerator, method: methods.Method, components) -> Tuple[Dict[str, float], Image.Image]:
        """Adherence metrics of "a {colour} {shape}" samples (generation sharded) and their grid."""
        quality = generation_quality(self._pipeline(method, components), self._sampling(), classifier=self.classifier,
                                     adherence_per_combo=self.plan.adherence_per_combo, accelerator=accelerator)
        metrics = {f"eval/adherence_{k}": float(quality["adherence"][f"adherence/{k}"]) for k in ADHERENCE_KEYS}
        return metrics, quality["grid"]

    def _prompt_grid(self, accelerator, method: methods.Method, components) -> Image.Image:
        """One captioned sample per grid prompt (generation sharded, images gathered)."""
        prompts = list(self.plan.grid_prompts)
        images = generate_images(self._pipeline(method, components), prompts, self._sampling(), accelerator)  # (N, 3, H, W)
        return make_grid(to_pil(images), prompts, upscale=max(1, 64 // images.shape[-1]))

    def _features(self, accelerator, method: methods.Method, components) -> Dict[str, float]:
        """Top-1 zero-shot accuracy per task and retrieval recall, with the run's zero-shot settings (``zeroshot.*``)."""
        t = self.cfg.train
        pipe = method.zero_shot_pipeline(components, self.cfg)
        settings = ZeroShotSettings(method="diffdis", seed=t.seed, batch_size=t.eval_batch_size)
        metrics: Dict[str, float] = {}
        if self.zero_shot_data is not None:
            images, tasks = self.zero_shot_data
            results = zero_shot(pipe, tasks, images, settings, accelerator)
            metrics.update({f"eval/zeroshot_{task}": float(res["metrics"]["acc1"]) for task, res in results.items()})
        if self.retrieval_data is not None:
            images, captions = self.retrieval_data
            found = retrieval(pipe, images, captions, settings, accelerator)["retrieval"]["metrics"]
            metrics.update({f"eval/{key}": float(value) for key, value in found.items() if "recall@" in key})
        return metrics
