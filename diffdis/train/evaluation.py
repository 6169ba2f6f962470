"""Evaluation during training: prompt adherence, zero-shot accuracy and a sample grid.

Every ``train.eval_every`` steps the trainer calls a :class:`TrainingEvaluator` on **all** processes:
image generation (:func:`diffdis.eval.api.generation_quality`, whose match counts are summed over
processes; only the grid's images are gathered) and zero-shot feature extraction
(:func:`diffdis.eval.api.zero_shot`, features gathered) are sharded across processes, so every
process returns the same metrics and no process idles while rank 0 works. Both are the functions
``tools/evaluate.py`` and ``tools/zeroshot.py`` report with, so the numbers logged here are those
tools' numbers for the same settings.

The metrics are only meaningful on the embedded shapes data: the reference attribute classifier and
the zero-shot tasks (``shape``, ``colour``, ``colour_shape``) know its shapes and colours. A run with
``train.eval_every > 0`` on other data is therefore rejected at start-up with a
:class:`~diffdis.config.ConfigError` (:func:`diffdis.config.check_evaluation_data`, called by
:func:`diffdis.config.load_config` and again by :meth:`TrainingEvaluator.from_config`) rather than warned about and skipped: a misconfigured run fails
before it trains instead of silently logging nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from PIL import Image

from .. import methods
from ..config import check_evaluation_data
from ..data.embedded import make_embedded_dataset
from ..data.transforms import to_pixel_values
from ..eval.api import ZeroShotSettings, ZeroShotTask, generation_quality, zero_shot
from ..eval.reference import AttributeClassifier, load_or_train_reference_classifier
from ..eval.suite import SamplingSettings
from ..eval.zeroshot import EMBEDDED_TASKS, embedded_labels, load_task
from ..pipelines import make_scheduler

logger = logging.getLogger("diffdis.train")

REFERENCE_RESOLUTION = 16  # the reference classifier's input size (generated images are resized to it)
ADHERENCE_KEYS = ("shape", "colour", "both", "colour_pixel")


def evaluation_sizes(cfg) -> Tuple[int, int]:
    """``(adherence images per shape x colour prompt, zero-shot test images)`` of a run's evaluation during training:
    ``train.eval_adherence_per_combo`` and ``train.eval_zeroshot_samples``, each 0 where the run's method does not
    train the stream it scores (generation; the discrimination stream)."""
    method, t = methods.get(cfg.method), cfg.train
    adherence = t.eval_adherence_per_combo if method.trains_generation(cfg.loss) else 0
    zeroshot = t.eval_zeroshot_samples if method.trains_discrimination(cfg.loss) else 0
    return adherence, zeroshot


def embedded_test_subset(num: int, resolution: int, seed: int = 0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The first ``num`` embedded test images as pixels (N, 3, R, R) in [-1, 1] and labels (N,) per task."""
    dataset = make_embedded_dataset("test", num, resolution=resolution, seed=seed)
    pixels = torch.stack([to_pixel_values(im) for im in dataset["image"]])  # (N, 3, R, R)
    return pixels, {task: embedded_labels(dataset, task) for task in EMBEDDED_TASKS}


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
    """Prompt adherence, zero-shot accuracy and a shapes x colours sample grid of the live model.

    Built once before the training loop (:meth:`from_config`) with everything that does not change
    during training: the fixed test subset, its labels, the class names and templates, and the
    reference classifier. Calling it evaluates the modules as they are (the trainer swaps the EMA
    weights in first); see the module docstring for why non-embedded data is a start-up error.

    Args:
        cfg: the run config: sizes and sampler settings are its ``train.eval_*`` keys (:func:`evaluation_sizes`),
            the noise seed ``train.seed``, the text forward process's gamma ``loss.text_scale``.
        classifier: the reference attribute classifier (needed when adherence is on).
        pixels: zero-shot test images (N, 3, R, R) in [-1, 1] (needed when zero-shot is on).
        labels: ``{task: (N,) class ids}`` of ``pixels`` for every task of ``EMBEDDED_TASKS``.
    """

    def __init__(
        self,
        cfg,
        classifier: Optional[AttributeClassifier] = None,
        pixels: Optional[torch.Tensor] = None,
        labels: Optional[Dict[str, torch.Tensor]] = None,
    ):
        self.cfg = cfg
        self.adherence_per_combo, self.zeroshot_samples = evaluation_sizes(cfg)
        if self.adherence_per_combo > 0 and classifier is None:
            raise ValueError("prompt adherence needs the reference classifier")
        if self.zeroshot_samples > 0 and (pixels is None or labels is None):
            raise ValueError("zero-shot accuracy needs the test images and their labels")
        self.classifier = classifier
        self.pixels = pixels  # (N, 3, R, R)
        self.labels = labels or {}
        self.tasks = (
            {task: ZeroShotTask(self.labels[task], *load_task(task)) for task in EMBEDDED_TASKS}
            if self.zeroshot_samples > 0 else {}
        )

    @classmethod
    def from_config(cls, cfg, accelerator=None, classifier: Optional[AttributeClassifier] = None) -> "TrainingEvaluator":
        """Build from a run config (call on every process, inside ``accelerator.main_process_first()``).

        The reference classifier is loaded from its disk cache (trained and cached on a miss), so the
        main process must go first: the others then find it cached instead of training it too.

        Raises:
            ConfigError: ``train.eval_every > 0`` with data other than the embedded shapes.
        """
        check_evaluation_data(cfg)
        adherence, zeroshot = evaluation_sizes(cfg)
        device = accelerator.device if accelerator is not None else "cpu"
        if classifier is None and adherence > 0:
            classifier = load_or_train_reference_classifier(resolution=REFERENCE_RESOLUTION, device=device)
        if classifier is not None:
            classifier = classifier.to(device).eval()
        pixels, labels = None, None
        if zeroshot > 0:
            pixels, labels = embedded_test_subset(zeroshot, cfg.data.resolution, cfg.data.seed)
        return cls(cfg, classifier, pixels, labels)

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
            ``(metrics, grid)``: ``eval/adherence_{shape,colour,both,colour_pixel}`` (with adherence on),
            ``eval/zeroshot_{shape,colour,colour_shape}`` (top-1, with zero-shot on) and ``eval/seconds``;
            the captioned shapes x colours grid as a PIL image, or None when adherence is off.
        """
        start = time.perf_counter()
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        metrics: Dict[str, float] = {}
        grid = None
        # fixed per-image generators drive all sampling; fork_rng keeps the training RNG untouched regardless
        device = next(method.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with eval_mode([method, components.vae]), torch.random.fork_rng(devices=devices), autocast:
            if self.adherence_per_combo > 0:
                adherence, grid = self._adherence(accelerator, method, components)
                metrics.update(adherence)
            if self.zeroshot_samples > 0:
                metrics.update(self._zero_shot(accelerator, method, components))
        metrics["eval/seconds"] = time.perf_counter() - start
        logger.debug(f"evaluation at step {step} took {metrics['eval/seconds']:.1f} s")
        return metrics, grid

    def _adherence(self, accelerator, method: methods.Method, components) -> Tuple[Dict[str, float], Image.Image]:
        """Adherence metrics of "a {colour} {shape}" samples (generation sharded) and their grid."""
        t = self.cfg.train
        pipe = method.text_to_image_pipeline(components, make_scheduler("ddim", components.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        sampling = SamplingSettings(steps=t.eval_steps, guidance=t.eval_guidance, scheduler="ddim", seed=t.seed,
                                    batch_size=t.eval_batch_size)
        quality = generation_quality(pipe, sampling, classifier=self.classifier, adherence_per_combo=self.adherence_per_combo,
                                     accelerator=accelerator)
        metrics = {f"eval/adherence_{k}": float(quality["adherence"][f"adherence/{k}"]) for k in ADHERENCE_KEYS}
        return metrics, quality["grid"]

    def _zero_shot(self, accelerator, method: methods.Method, components) -> Dict[str, float]:
        """Top-1 zero-shot accuracy per embedded task with the run's zero-shot settings (``zeroshot.*``); the features
        are sharded, then shared by all tasks."""
        t = self.cfg.train
        pipe = method.zero_shot_pipeline(components, self.cfg)
        settings = ZeroShotSettings(method="diffdis", seed=t.seed, batch_size=t.eval_batch_size)
        results = zero_shot(pipe, self.tasks, self.pixels, settings, accelerator)
        return {f"eval/zeroshot_{task}": float(res["metrics"]["acc1"]) for task, res in results.items()}
