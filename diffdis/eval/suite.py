"""Generation-side evaluation runs: sample images for a list of prompts (sharded across processes),
then score them by prompt adherence and FID.

Scores are running sums: each process feeds its images batch by batch into per-process statistics
(FID feature sums, adherence match counts) and only those are added over processes, so memory does
not grow with the number of images and no image is gathered (but the few of the sample grid).

These are the building blocks of ``tools/evaluate.py`` and of evaluation during training; each
returns a flat metric dict with the settings that produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffdis.eval.adherence import adherence_counts, adherence_from_counts, adherence_prompts
from diffdis.eval.fid import (
    FeatureExtractor,
    accumulate_real_statistics,
    fid_metric_report,
    new_fid_metric,
    sum_fid_states,
    update_fid,
)
from diffdis.eval.reference import AttributeClassifier
from diffdis.utils.distributed import gather_objects, is_distributed, sum_over_processes

FID_BATCH_SIZE = 256  # images per feature-extractor call on the real side (and at most on the fake side)
_ADHERENCE_COUNTS = ("shape", "colour", "both", "colour_pixel", "colour_agreement", "num_images")


@dataclass
class SamplingSettings:
    """How evaluation images are generated (written into every result: FIDs depend on all of it)."""

    steps: int = 25
    guidance: float = 3.0
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 64


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` that process ``rank`` of ``world`` handles (blocks in rank order)."""
    per = -(-n // world)
    start = min(n, rank * per)
    return range(start, min(n, start + per))


def _shard(n: int, accelerator) -> range:
    """This process's block of ``range(n)`` (all of it without an accelerator)."""
    if accelerator is None:
        return range(n)
    return shard_range(n, accelerator.process_index, accelerator.num_processes)


def _gather(images: torch.Tensor, accelerator) -> torch.Tensor:
    """Concatenate every process's block in rank order (blocks may differ in length)."""
    if not is_distributed(accelerator):
        return images
    parts = [part for part in gather_objects([images.cpu()], accelerator) if part.shape[0] > 0]
    return torch.cat(parts) if parts else images


def _to_uint8(images: np.ndarray) -> torch.Tensor:
    """Pipeline output (b, H, W, 3) float in [0, 1] -> uint8 (b, 3, H, W)."""
    return torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)


@torch.no_grad()
def generate_batches(
    pipe,
    prompts: Sequence[str],
    settings: SamplingSettings,
    accelerator=None,
    progress: bool = False,
) -> Iterator[Tuple[range, torch.Tensor]]:
    """This process's images for ``prompts``, batch by batch: ``(indices, uint8 images (b, 3, H, W))``.

    Image i uses seed ``settings.seed + i``, so an image does not depend on the number of processes.
    With an ``accelerator`` each process generates a contiguous block of the prompts (:func:`shard_range`);
    a process may get no batch at all when there are fewer prompts than processes.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from")
    mine = _shard(len(prompts), accelerator)
    was_disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    try:
        starts = range(mine.start, mine.stop, settings.batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
            idx = range(start, min(mine.stop, start + settings.batch_size))
            gens = [torch.Generator(device="cpu").manual_seed(settings.seed + i) for i in idx]
            out = pipe(
                [prompts[i] for i in idx], num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                generator=gens, output_type="np",
            ).images  # (b, H, W, 3) float in [0, 1]
            yield idx, _to_uint8(out)
    finally:
        pipe.set_progress_bar_config(disable=was_disabled)


def generate_images(
    pipe,
    prompts: Sequence[str],
    settings: SamplingSettings,
    accelerator=None,
    progress: bool = False,
) -> torch.Tensor:
    """uint8 images (N, 3, H, W) for ``prompts``; image i uses seed ``settings.seed + i``.

    With an ``accelerator`` each process generates a contiguous block of the prompts and every process
    returns all N images, so the result does not depend on the number of processes. This holds every
    image on every process: for metrics over many images stream :func:`generate_batches` instead.
    """
    chunks = [images for _, images in generate_batches(pipe, prompts, settings, accelerator, progress)]
    local = torch.cat(chunks) if chunks else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return _gather(local, accelerator)


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """uint8 (N, 3, H, W) -> PIL images."""
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


class LazyImages:
    """A set of images read one at a time: ``len()`` and slicing like an (N, 3, H, W) uint8 tensor.

    ``images[a:b]`` loads only images a..b-1, so an evaluation can stream (and shard) a reference set
    far larger than memory.

    Args:
        load: image i as a PIL image, already at the evaluation resolution (converted to RGB here).
        num: number of images.
    """

    def __init__(self, load: Callable[[int], Image.Image], num: int) -> None:
        self.load = load
        self.num = num

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: slice) -> torch.Tensor:
        """uint8 images (b, 3, H, W) of a slice of the set."""
        if not isinstance(index, slice):
            raise TypeError(f"LazyImages supports slices only, got {type(index).__name__}")
        arrays = [np.array(self.load(i).convert("RGB"), dtype=np.uint8) for i in range(*index.indices(self.num))]
        if not arrays:
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (b, 3, H, W)


ImageSet = Union[torch.Tensor, LazyImages]  # uint8 (N, 3, H, W) in memory, or read on demand


def shard_batches(images: ImageSet, batch_size: int, accelerator=None) -> Iterator[torch.Tensor]:
    """This process's contiguous block of ``images`` (a uint8 tensor or :class:`LazyImages`), batch by batch."""
    mine = _shard(len(images), accelerator)
    for start in range(mine.start, mine.stop, batch_size):
        yield images[start : min(mine.stop, start + batch_size)]


def _grid_indices(prompts: Sequence[dict]) -> List[int]:
    """Index of the first prompt of each shape x colour combination, in (shape, colour) order."""
    first: Dict[Tuple[int, int], int] = {}
    for i, p in enumerate(prompts):
        first.setdefault((p["shape_id"], p["colour_id"]), i)
    return [first[k] for k in sorted(first)]


def evaluate_adherence(
    pipe,
    classifier: AttributeClassifier,
    num_per_combo: int = 2,
    settings: Optional[SamplingSettings] = None,
    accelerator=None,
    progress: bool = False,
):
    """Prompt adherence on "a {colour} {shape}" for every shape x colour, ``num_per_combo`` images each.

    Each process scores its shard batch by batch; only the match counts are summed over processes,
    and only the first image of each combination is kept (and gathered) for the sample grid.

    Returns ``(metrics, images, prompts)``: the metrics of :func:`prompt_adherence` over all images plus
    the settings; the first image of each combination (36, 3, H, W) uint8 in (shape, colour) order and
    the prompts that made them (``prompts[i]`` describes image i), as :func:`adherence_grid` takes them.
    """
    settings = settings or SamplingSettings()
    prompts = adherence_prompts(num_per_combo, seed=None)
    keep = set(_grid_indices(prompts))
    counts: Dict[str, int] = dict.fromkeys(_ADHERENCE_COUNTS, 0)
    kept: List[Tuple[int, torch.Tensor]] = []
    for idx, images in generate_batches(pipe, [p["prompt"] for p in prompts], settings, accelerator, progress):
        batch = [prompts[i] for i in idx]
        found = adherence_counts(images, [p["shape_id"] for p in batch], [p["colour_id"] for p in batch], classifier)
        counts = {name: counts[name] + found[name] for name in _ADHERENCE_COUNTS}
        kept += [(i, images[j].clone()) for j, i in enumerate(idx) if i in keep]  # a view would pin its batch
    local = torch.tensor([counts[name] for name in _ADHERENCE_COUNTS], dtype=torch.long)  # (6,): one all_reduce
    totals = sum_over_processes({"counts": local}, accelerator)["counts"]
    metrics = adherence_from_counts(dict(zip(_ADHERENCE_COUNTS, totals.tolist())))
    metrics.update({f"adherence/{k}": v for k, v in asdict(settings).items() if k != "batch_size"})
    kept = sorted(gather_objects(kept, accelerator), key=lambda item: item[0])
    return metrics, torch.stack([image for _, image in kept]), [prompts[i] for i, _ in kept]


def evaluate_fid(
    pipe,
    captions: Sequence[str],
    real_images: ImageSet,
    extractor: FeatureExtractor,
    reference_name: str,
    settings: Optional[SamplingSettings] = None,
    real_stats_cache: Optional[Union[str, Path]] = None,
    accelerator=None,
    progress: bool = False,
) -> dict:
    """FID of images generated from ``captions`` against ``real_images`` (uint8 (N, 3, H, W) or :class:`LazyImages`).

    Each process generates its shard of the captions and streams every batch straight into the FID
    running sums, and likewise reads its shard of the real images (unless their statistics are
    cached); only the sums are added over processes. Memory stays at about one batch of images
    whatever the set sizes. Returns ``fid``, the feature space, resize mode, image counts, the
    reference set's name and the sampling settings.
    """
    settings = settings or SamplingSettings()
    metric = new_fid_metric(extractor)
    real = shard_batches(real_images, FID_BATCH_SIZE, accelerator)  # lazy: not read on a cache hit
    key = f"{reference_name}-n{len(real_images)}"
    accumulate_real_statistics(metric, real, extractor, FID_BATCH_SIZE, real_stats_cache, key, accelerator)
    for _, images in generate_batches(pipe, captions, settings, accelerator, progress):
        update_fid(metric, images, real=False, batch_size=FID_BATCH_SIZE)
    sum_fid_states(metric, real=False, accelerator=accelerator)
    report = fid_metric_report(metric, extractor)
    report.update(reference=reference_name, **asdict(settings))
    report.pop("batch_size")
    return report


def adherence_grid(images: torch.Tensor, prompts: Sequence[dict], upscale: int = 4) -> Image.Image:
    """One image per shape x colour combination: rows are shapes, columns colours, each captioned."""
    from diffdis.data.embedded import COLOURS
    from diffdis.utils.images import make_grid

    order = _grid_indices(prompts)
    tiles = to_pil(images[order])
    return make_grid(tiles, [prompts[i]["prompt"].removeprefix("a ") for i in order], ncols=len(COLOURS), upscale=upscale)
