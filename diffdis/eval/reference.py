"""Reference attribute classifier for the embedded coloured-shapes dataset.

A small CNN trained on the real images of the embedded dataset. It scores prompt
adherence of generated images (shape / colour / size / position) and its
penultimate features are the offline FID feature space (DESIGN.md section 4).

A scorer trained only on clean images is confidently wrong on generated images
(DESIGN.md section 5), so training uses noise, blur, colour jitter and small
shifts. ``pixel_colour`` is a non-learned colour measure to cross-check it.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffdis.data import embedded

# Bump when the architecture, the augmentations or the training recipe change, so
# that cached weights from an older recipe are not reused.
REFERENCE_VERSION = "v1"
DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 3e-3
ATTRIBUTES = ("shape", "colour", "size", "position")

def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images in [0, 255] or float images in [0, 1] to float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def colour_rgb_table() -> torch.Tensor:
    """Nominal RGB values (num_colours, 3) in [0, 1] of ``embedded.COLOURS``, in id order."""
    return torch.tensor(embedded.COLOUR_RGB, dtype=torch.float32) / 255.0


class AttributeClassifier(nn.Module):
    """Small CNN with one linear head per attribute (shape, colour, size, position).

    Two coordinate channels are appended to the input so that the globally pooled
    features still know where the shape is (position head).

    Args:
        resolution: input side length the classifier is trained at (16 or 32).
        num_shapes, num_colours, num_sizes, num_positions: classes per head.
        width: channels of the first stage (doubled at each of the two downsamplings).
        feature_dim: dimension of the penultimate features (FID feature space).
    """

    def __init__(
        self,
        resolution: int = 16,
        num_shapes: int = 6,
        num_colours: int = 6,
        num_sizes: int = 2,
        num_positions: int = 5,
        width: int = 32,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.config: dict[str, int] = dict(
            resolution=resolution,
            num_shapes=num_shapes,
            num_colours=num_colours,
            num_sizes=num_sizes,
            num_positions=num_positions,
            width=width,
            feature_dim=feature_dim,
        )
        self.resolution = resolution
        self.feature_dim = feature_dim
        w = width
        # Above 16 px the stem downsamples, so the body always runs at <= 16x16 (training cost).
        stem_stride = max(1, resolution // 16)
        self.body = nn.Sequential(
            _conv_block(3 + 2, w, stride=stem_stride, kernel_size=2 * stem_stride + 1),
            _conv_block(w, w, stride=1),
            _conv_block(w, 2 * w, stride=2),
            _conv_block(2 * w, 2 * w, stride=1),
            _conv_block(2 * w, 4 * w, stride=2),
            _conv_block(4 * w, 4 * w, stride=1),
        )
        self.proj = nn.Sequential(nn.Linear(8 * w, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict(
            {
                "shape": nn.Linear(feature_dim, num_shapes),
                "colour": nn.Linear(feature_dim, num_colours),
                "size": nn.Linear(feature_dim, num_sizes),
                "position": nn.Linear(feature_dim, num_positions),
            }
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images (N, 3, H, W), uint8 or float in [0, 1]."""
        x = to_unit_float(x) * 2.0 - 1.0  # (N, 3, H, W) in [-1, 1]
        n, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        x = torch.cat([x, ys, xs], dim=1)  # (N, 5, H, W)
        x = self.body(x)  # (N, 4w, H/(4*stem_stride), W/(4*stem_stride))
        # Mean pool sees area (size), max pool sees the strongest response (shape, colour).
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (N, 8w)
        return self.proj(pooled)  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: ``{"shape": (N, S), "colour": (N, C), "size": ..., "position": ...}``."""
        feats = self.features(x)  # (N, feature_dim)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Arg-max class ids per attribute, (N,) each, computed in eval mode in batches."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        preds: dict[str, list[torch.Tensor]] = {name: [] for name in self.heads}
        for start in range(0, images.shape[0], batch_size):
            logits = self(images[start : start + batch_size].to(device))
            for name, value in logits.items():
                preds[name].append(value.argmax(dim=-1).cpu())
        self.train(was_training)
        return {name: torch.cat(values) for name, values in preds.items()}


def _conv_block(c_in: int, c_out: int, stride: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (odd kernel, same padding), GroupNorm, SiLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(),
    )


# ----------------------------------------------------------------------------- data


def dataset_tensors(dataset: datasets.Dataset) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images (N, 3, H, W) uint8 and label ids ``{"shape": (N,), ...}`` of an embedded dataset."""
    images = np.stack([np.asarray(row["image"].convert("RGB")) for row in dataset])  # (N, H, W, 3)
    labels = {name: torch.tensor(dataset[f"{name}_id"], dtype=torch.long) for name in ATTRIBUTES}
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random shift, colour/brightness jitter, blur and Gaussian noise, float (N, 3, H, W) in [0, 1].

    Shifts are at most 1 pixel so that the position label stays valid.
    """
    x = to_unit_float(images)
    n = x.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    x = _random_shift(x, generator, max_shift=1)
    brightness = uniform(1 - 0.3 * strength, 1 + 0.15 * strength, n, 1, 1, 1)
    gain = uniform(1 - 0.1 * strength, 1 + 0.1 * strength, n, 3, 1, 1)
    offset = uniform(0.0, 0.08 * strength, n, 1, 1, 1)
    x = x * brightness * gain + offset  # brighter background, dimmer / tinted shape
    blur_mix = uniform(0.0, strength, n, 1, 1, 1) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.6)
    x = (1 - blur_mix) * x + blur_mix * _blur(x)
    sigma = uniform(0.0, 0.15 * strength, n, 1, 1, 1) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.8)
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 1.0)


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (edge padding), (N, 3, H, W)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, mode="replicate")  # (N, 3, H+2s, W+2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial (Gaussian-like) blur per channel, (N, 3, H, W)."""
    k1 = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    kernel = (k1[:, None] * k1[None, :] / 16.0).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="replicate"), kernel, groups=x.shape[1])


# ------------------------------------------------------------------------- training


def train_reference_classifier(
    resolution: int = 16,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    num_train: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    cache_dir: Optional[Union[str, Path]] = None,
    num_threads: Optional[int] = None,
) -> AttributeClassifier:
    """Train an ``AttributeClassifier`` on the embedded train split with augmentations.

    Args:
        resolution: image side length of the embedded dataset.
        seed: seed of the dataset, the initialisation and the batch / augmentation draws.
        steps: optimiser steps (AdamW, one-cycle cosine schedule).
        batch_size: images per step.
        lr: peak learning rate.
        num_train: training images (None: the split's default size).
        device: device to train on.
        cache_dir: if given, the trained weights are saved there, keyed by all the arguments
            above (see ``load_or_train_reference_classifier``).
        num_threads: torch intra-op threads while training (restored afterwards); 1 is much
            faster than 2 on a CPU shared with other jobs. None: leave torch's setting.
    """
    args = _training_args(resolution, seed, steps, batch_size, lr, num_train)
    start = time.perf_counter()
    with _torch_threads(num_threads):
        model = _train(args, device)
    if cache_dir is not None:
        extra = {"train_args": args, "train_seconds": round(time.perf_counter() - start, 1)}
        save_classifier(model, _cache_path(cache_dir, args), extra=extra)
    return model


@contextlib.contextmanager
def _torch_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (no-op for None)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(args: dict[str, Any], device: Union[str, torch.device]) -> AttributeClassifier:
    """The training loop of ``train_reference_classifier`` (``args`` from ``_training_args``)."""
    resolution, seed, steps = args["resolution"], args["seed"], args["steps"]
    batch_size, lr, num_train = args["batch_size"], args["lr"], args["num_train"]
    images, labels = dataset_tensors(
        embedded.make_embedded_dataset("train", num_samples=num_train, resolution=resolution, seed=seed)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeClassifier(
            resolution=resolution,
            num_shapes=len(embedded.SHAPES),
            num_colours=len(embedded.COLOURS),
            num_sizes=len(embedded.SIZES),
            num_positions=len(embedded.POSITIONS),
        )
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        # Every fourth image stays clean so the clean test accuracy does not suffer.
        x = augment(images[idx], generator)
        clean = torch.arange(batch_size) % 4 == 0
        x[clean] = to_unit_float(images[idx[clean]])
        logits = model(x.to(device))
        loss = sum(
            F.cross_entropy(logits[name], labels[name][idx].to(device), label_smoothing=0.05) for name in ATTRIBUTES
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


def evaluate_classifier(
    model: AttributeClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Accuracy per attribute of ``model`` on images (N, 3, H, W) with label ids ``{"shape": (N,), ...}``."""
    preds = model.predict(images)
    return {name: (preds[name] == labels[name]).float().mean().item() for name in labels if name in preds}


# ---------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$DIFFDIS_CACHE/reference`` or ``~/.cache/diffdis/reference``."""
    root = os.environ.get("DIFFDIS_CACHE")
    return Path(root) / "reference" if root else Path.home() / ".cache" / "diffdis" / "reference"


def _training_args(
    resolution: int, seed: int, steps: int, batch_size: int, lr: float, num_train: Optional[int]
) -> dict[str, Any]:
    """Everything that determines the trained weights (the cache key)."""
    return dict(
        resolution=resolution,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        num_train=num_train,
        version=REFERENCE_VERSION,
    )


def _cache_path(cache_dir: Union[str, Path], args: dict[str, Any]) -> Path:
    """Weights file of a cached classifier; the json of its arguments sits beside it."""
    digest = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:8]
    name = f"attribute_classifier_r{args['resolution']}_s{args['seed']}_n{args['steps']}_{REFERENCE_VERSION}_{digest}"
    return Path(cache_dir) / f"{name}.safetensors"


def save_classifier(model: AttributeClassifier, path: Union[str, Path], extra: Optional[dict] = None) -> None:
    """Write weights (safetensors) and ``<path>.json`` (constructor args + ``extra``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": model.config, "version": REFERENCE_VERSION, **(extra or {})}
    _atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    _atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))


def load_classifier(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> AttributeClassifier:
    """Load a classifier written by ``save_classifier`` (in eval mode)."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    model = AttributeClassifier(**meta["config"])
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_or_train_reference_classifier(
    resolution: int = 16,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    cache_dir: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    num_train: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> AttributeClassifier:
    """Load the cached reference classifier for these training arguments, training it if absent.

    Args:
        resolution, seed, steps, batch_size, lr, num_train, num_threads: see
            ``train_reference_classifier``.
        cache_dir: cache folder (default ``default_cache_dir()``).
        device: device of the returned model.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_path(cache_dir, _training_args(resolution, seed, steps, batch_size, lr, num_train))
    if path.exists() and path.with_suffix(".json").exists():
        return load_classifier(path, device)
    return train_reference_classifier(
        resolution=resolution,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        num_train=num_train,
        device=device,
        cache_dir=cache_dir,
        num_threads=num_threads,
    )

# ----------------------------------------------------------------- pixel measure


def pixel_colour(images: torch.Tensor, top_fraction: float = 0.5) -> torch.Tensor:
    """Colour id (N,) nearest in RGB to the mean colour of each image's shape region.

    The shape region is the set of pixels whose brightness (max over channels) lies in the
    upper ``top_fraction`` of the image's brightness range: on the dark background these are
    the shape's pixels. A non-learned cross-check of the classifier's colour head.

    Args:
        images: (N, 3, H, W) uint8 or float in [0, 1].
        top_fraction: share of the [min, max] brightness range that counts as the shape.
    """
    x = to_unit_float(images)  # (N, 3, H, W)
    value = x.amax(dim=1)  # (N, H, W)
    low = value.flatten(1).amin(dim=1).view(-1, 1, 1)
    high = value.flatten(1).amax(dim=1).view(-1, 1, 1)
    mask = (value >= high - top_fraction * (high - low)).unsqueeze(1).float()  # (N, 1, H, W)
    mean_rgb = (x * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp_min(1.0)  # (N, 3)
    table = colour_rgb_table().to(x.device)  # (C, 3)
    return torch.cdist(mean_rgb, table).argmin(dim=1)
