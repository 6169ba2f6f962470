"""Stand-ins for evaluation tests (import read-only from any test): a pipeline that draws tinted noise,
a 6-feature extractor, fixed real images, and one evaluation run that records what it synchronised.

``evaluate_everything`` runs on one process (``accelerator=None``) inside pytest and, through a small
launcher script, on two CPU processes under ``accelerate launch``; the two results must agree.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional
from unittest import mock

import torch

from diffdis.data.embedded import COLOUR_RGB, COLOURS
from diffdis.eval.fid import FeatureExtractor, fid_report
from diffdis.eval.reference import AttributeClassifier
from diffdis.eval.suite import (
    LazyImages,
    SamplingSettings,
    evaluate_adherence,
    evaluate_fid,
    generate_images,
    shard_batches,
)

NUM_IMAGES = 48  # 24 per process: 3 batches of 8 either way, so features see the same batches
SETTINGS = SamplingSettings(steps=1, guidance=1.0, scheduler="ddim", seed=0, batch_size=8)
GATHERS = ("all_gather", "all_gather_object", "all_gather_into_tensor", "gather", "gather_object")


class TintedNoisePipe:
    """A pipeline stand-in: image i is noise from its own generator, tinted by the colour its prompt names."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._progress_bar_config: Dict = {}

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = dict(kwargs)

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type="np"):
        images = [self._image(p, g) for p, g in zip(prompts, generator)]
        return SimpleNamespace(images=torch.stack(images).numpy())  # (b, H, W, 3) float in [0, 1]

    def _image(self, prompt: str, generator: torch.Generator) -> torch.Tensor:
        colour = next((c for c in COLOURS if c in prompt.split()), "red")
        tint = torch.tensor(COLOUR_RGB[COLOURS.index(colour)], dtype=torch.float32) / 255
        return 0.35 * torch.rand(self.size, self.size, 3, generator=generator) + 0.6 * tint  # (H, W, 3)


class ChannelMoments(torch.nn.Module):
    """Per-channel mean, std and max of images (N, 3, H, W) in [0, 1]: 9 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (N, 9)


def moments_extractor() -> FeatureExtractor:
    """A 9-feature extractor (well-conditioned covariances with a few dozen images)."""
    return FeatureExtractor(ChannelMoments(), num_features=9, name="channel-moments")


def captions(num: int = NUM_IMAGES) -> List[str]:
    """Prompts naming every colour in turn."""
    return [f"a {COLOURS[i % len(COLOURS)]} circle" for i in range(num)]


def real_images(num: int = NUM_IMAGES, size: int = 8) -> torch.Tensor:
    """Fixed uint8 "real" images (N, 3, H, W)."""
    return torch.randint(0, 256, (num, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def lazy(images: torch.Tensor) -> LazyImages:
    """``images`` behind the read-on-demand interface of a reference set on disk."""
    from PIL import Image

    return LazyImages(lambda i: Image.fromarray(images[i].permute(1, 2, 0).numpy()), images.shape[0])


@contextmanager
def recording_collectives() -> Iterator[Dict[str, int]]:
    """Count calls of torch.distributed's gathers and all_reduce, and images each process feeds to FID."""
    import torch.distributed as dist
    from torchmetrics.image.fid import FrechetInceptionDistance

    counts: Dict[str, int] = {"all_reduce": 0, "real_images": 0, "fake_images": 0, **{g: 0 for g in GATHERS}}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    original_update = FrechetInceptionDistance.update

    def update(metric, imgs, real):
        counts["real_images" if real else "fake_images"] += imgs.shape[0]
        return original_update(metric, imgs, real)

    with ExitStack() as stack:
        for name in GATHERS + ("all_reduce",):
            stack.enter_context(mock.patch.object(dist, name, counted(name, getattr(dist, name))))
        stack.enter_context(mock.patch.object(FrechetInceptionDistance, "update", update))
        yield counts


def evaluate_everything(accelerator, out_dir: Path, cache_dir: Optional[Path] = None) -> Dict:
    """FID (uncached, then from the real-statistics cache written by the first run; then ``fid_report``
    on this process's shards of fixed image sets) and adherence.

    Writes ``rank<r>.json`` (results and what was synchronised) and ``grid<r>.pt`` (the grid images)
    into ``out_dir``, and returns the results.
    """
    out_dir = Path(out_dir)
    pipe, extractor = TintedNoisePipe(), moments_extractor()
    args = (pipe, captions(), lazy(real_images()), extractor, "synthetic", SETTINGS)
    result: Dict = {}
    with recording_collectives() as calls:
        result["fid"] = evaluate_fid(*args, real_stats_cache=cache_dir, accelerator=accelerator)
    result["fid_calls"] = dict(calls)
    if cache_dir is not None:
        with recording_collectives() as calls:
            result["fid_cached"] = evaluate_fid(*args, real_stats_cache=cache_dir, accelerator=accelerator)
        result["fid_cached_calls"] = dict(calls)
    fake = generate_images(pipe, captions(), SETTINGS)  # every image, to hand fid_report this process's shards
    with recording_collectives() as calls:
        shards = [shard_batches(images, 5, accelerator) for images in (real_images(), fake)]
        result["fid_report"] = fid_report(*shards, extractor, batch_size=5, accelerator=accelerator)
    result["fid_report_calls"] = dict(calls)
    torch.manual_seed(0)  # the same random classifier on every process
    classifier = AttributeClassifier(resolution=16).eval()
    with recording_collectives() as calls:
        metrics, images, prompts = evaluate_adherence(pipe, classifier, 2, SETTINGS, accelerator)
    result.update(adherence=metrics, adherence_calls=dict(calls), grid_prompts=[p["prompt"] for p in prompts])
    rank = accelerator.process_index if accelerator is not None else 0
    result["num_processes"] = accelerator.num_processes if accelerator is not None else 1
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    torch.save(images, out_dir / f"grid{rank}.pt")
    return result
