"""Generation-side evaluation runs: sample images for a list of prompts (sharded across processes),
then score them by prompt adherence and FID.

These are the building blocks of ``tools/evaluate.py`` and of evaluation during training; each
returns a flat metric dict with the settings that produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffdis.eval.adherence import adherence_prompts, prompt_adherence
from diffdis.eval.fid import FeatureExtractor, fid_report
from diffdis.eval.reference import AttributeClassifier


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
    if accelerator is None or accelerator.num_processes == 1:
        return images
    from accelerate.utils import gather_object

    return torch.cat(gather_object([images.cpu()]))


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    settings: SamplingSettings,
    accelerator=None,
    progress: bool = False,
) -> torch.Tensor:
    """uint8 images (N, 3, H, W) for ``prompts``; image i uses seed ``settings.seed + i``.

    With an ``accelerator`` each process generates a contiguous block of the prompts and every process
    returns all N images, so the result does not depend on the number of processes.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from")
    mine = _shard(len(prompts), accelerator)
    was_disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    chunks: List[torch.Tensor] = []
    starts = range(mine.start, mine.stop, settings.batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        idx = range(start, min(mine.stop, start + settings.batch_size))
        gens = [torch.Generator(device="cpu").manual_seed(settings.seed + i) for i in idx]
        out = pipe(
            [prompts[i] for i in idx], num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            generator=gens, output_type="np",
        ).images  # (b, H, W, 3) float in [0, 1]
        chunks.append(torch.from_numpy((np.clip(out, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
    pipe.set_progress_bar_config(disable=was_disabled)
    local = torch.cat(chunks) if chunks else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return _gather(local, accelerator)


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """uint8 (N, 3, H, W) -> PIL images."""
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


def evaluate_adherence(
    pipe,
    classifier: AttributeClassifier,
    num_per_combo: int = 2,
    settings: Optional[SamplingSettings] = None,
    accelerator=None,
    progress: bool = False,
):
    """Prompt adherence on "a {colour} {shape}" for every shape x colour, ``num_per_combo`` images each.

    Returns ``(metrics, images, prompts)``: the metrics of :func:`prompt_adherence` plus the settings;
    the images (N, 3, H, W) uint8 in shape-major order (``prompts[i]`` describes image i), so the first
    image of each combination makes a shapes x colours grid.
    """
    settings = settings or SamplingSettings()
    prompts = adherence_prompts(num_per_combo, seed=None)
    images = generate_images(pipe, [p["prompt"] for p in prompts], settings, accelerator, progress)
    metrics = prompt_adherence(images, [p["shape_id"] for p in prompts], [p["colour_id"] for p in prompts], classifier)
    metrics.update({f"adherence/{k}": v for k, v in asdict(settings).items() if k != "batch_size"})
    return metrics, images, prompts


def evaluate_fid(
    pipe,
    captions: Sequence[str],
    real_images: torch.Tensor,
    extractor: FeatureExtractor,
    reference_name: str,
    settings: Optional[SamplingSettings] = None,
    real_stats_cache: Optional[Union[str, Path]] = None,
    accelerator=None,
    progress: bool = False,
) -> dict:
    """FID of images generated from ``captions`` against ``real_images`` (uint8, (N, 3, H, W)).

    Generation is sharded across processes; the metric is computed once on the gathered images.
    Returns ``fid``, the feature space, resize mode, image counts, the reference set's name and
    the sampling settings.
    """
    settings = settings or SamplingSettings()
    fake = generate_images(pipe, captions, settings, accelerator, progress)
    key = f"{reference_name}-n{real_images.shape[0]}"
    report = fid_report(real_images, fake, extractor, real_stats_cache=real_stats_cache, cache_key=key)
    report.update(reference=reference_name, **asdict(settings))
    report.pop("batch_size")
    return report


def adherence_grid(images: torch.Tensor, prompts: Sequence[dict], upscale: int = 4) -> Image.Image:
    """One image per shape x colour combination: rows are shapes, columns colours, each captioned."""
    from diffdis.data.embedded import COLOURS
    from diffdis.utils.images import make_grid

    first = {}
    for i, p in enumerate(prompts):
        first.setdefault((p["shape_id"], p["colour_id"]), i)
    order = [first[k] for k in sorted(first)]
    tiles = to_pil(images[order])
    return make_grid(tiles, [prompts[i]["prompt"].removeprefix("a ") for i in order], ncols=len(COLOURS), upscale=upscale)
