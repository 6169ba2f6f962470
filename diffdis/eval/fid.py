"""Fréchet distance on torchmetrics' ``FrechetInceptionDistance`` with any feature extractor.

Offline default: the reference attribute classifier's penultimate features
(``reference_extractor``). With ``torch-fidelity`` installed and the Inception weights
on disk, ``inception_extractor`` gives the standard Inception-v3 FID. Every result
should be reported with its settings: use ``fid_report``.

Memory does not grow with the number of images: features go batch by batch into the metric's
running sums (feature sum, outer-product sum, count; float64), and with several processes each
process streams its own shard and only those sums are added over processes
(:func:`sum_fid_states`), never the images or their features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffdis.eval.reference import AttributeClassifier
from diffdis.utils.distributed import all_processes, sum_over_processes

ImagesLike = Union[torch.Tensor, Iterable[torch.Tensor]]
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_FAKE_STATES = ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


class FeatureExtractor(nn.Module):
    """Adapts a feature function to torchmetrics' custom-``feature`` FID interface.

    torchmetrics reads ``num_features`` (so it does not probe the model with a dummy
    (1, 3, 299, 299) image) and calls ``forward`` with the uint8 images given to ``update``.

    Args:
        model: the module owning the weights (kept in eval mode; features computed without gradients).
        feature_fn: maps images to features (N, num_features); ``model`` itself if None.
        num_features: feature dimension.
        name: identifies the feature space (and the weights) in reports and cache keys.
        input_size: side length the feature function expects; inputs of another size are
            resized with ``resize_mode``. None: pass images at their own size.
        resize_mode: ``F.interpolate`` mode; bilinear uses antialiasing when downsampling.
        uint8_input: pass uint8 images to ``feature_fn`` (else float in [0, 1]).
    """

    def __init__(
        self,
        model: nn.Module,
        num_features: int,
        name: str,
        feature_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        input_size: Optional[int] = None,
        resize_mode: str = "bilinear",
        uint8_input: bool = False,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.feature_fn = feature_fn if feature_fn is not None else model
        self.num_features = num_features
        self.name = name
        self.input_size = input_size
        self.resize_mode = resize_mode
        self.uint8_input = uint8_input

    @property
    def resize(self) -> str:
        """Human-readable resize setting, reported beside every FID value."""
        if self.input_size is None:
            return "none"
        antialias = "-antialias" if self.resize_mode == "bilinear" else ""
        return f"{self.resize_mode}{antialias}-{self.input_size}"

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stay in eval mode: the feature space must not change (dropout, norms)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, num_features) of uint8 images (N, 3, H, W) (float in [0, 1] also accepted)."""
        x = images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            antialias = self.resize_mode == "bilinear" and x.shape[-1] > self.input_size
            align = False if self.resize_mode in ("bilinear", "bicubic") else None
            x = F.interpolate(x.float(), size=size, mode=self.resize_mode, align_corners=align, antialias=antialias)
            x = x.clamp(0, 255).round().to(torch.uint8)  # (N, 3, S, S)
        if not self.uint8_input:
            x = x.float() / 255.0  # (N, 3, S, S) in [0, 1]
        return self.feature_fn(x).float().reshape(x.shape[0], -1)  # (N, num_features)


def reference_extractor(classifier: AttributeClassifier) -> FeatureExtractor:
    """Penultimate features of the reference classifier; inputs resized (bilinear) to its resolution."""
    digest = _weights_digest(classifier)
    return FeatureExtractor(
        classifier,
        num_features=classifier.feature_dim,
        name=f"reference-r{classifier.resolution}-{digest}",
        feature_fn=classifier.features,
        input_size=classifier.resolution,
        resize_mode="bilinear",
    )


def inception_extractor(weights_path: Union[str, Path]) -> FeatureExtractor:
    """Standard 2048-d Inception-v3 pool features (torch-fidelity's port), from a local weights file.

    Nothing can be downloaded, so the file must be on disk. Images are resized by the network
    itself to 299x299 (bilinear, antialiased, as torchmetrics' default).

    Raises:
        ModuleNotFoundError: ``torch-fidelity`` is not installed (optional extra).
        FileNotFoundError: ``weights_path`` does not exist.
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError("inception_extractor needs the optional `torch-fidelity` package")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}. Put the pt_inception-2015-12-05 weights file "
            f"({INCEPTION_WEIGHTS_NAME}, from the torch-fidelity releases) there and pass its path."
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
    )
    return FeatureExtractor(net, num_features=2048, name="inception-v3-2048", uint8_input=True)


def _weights_digest(module: nn.Module, length: int = 10) -> str:
    """Short hash of a module's parameters, so that cache keys change with the weights."""
    sha = hashlib.sha1()
    for key, value in sorted(module.state_dict().items()):
        sha.update(key.encode())
        sha.update(value.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:length]


def _batches(images: ImagesLike, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield image batches (B, 3, H, W) from a tensor or an iterable of batch tensors."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    for batch in images:
        batch = torch.as_tensor(batch)
        yield from _batches(batch.unsqueeze(0) if batch.dim() == 3 else batch, batch_size)


def _stats_path(real_stats_cache: Union[str, Path], cache_key: str, extractor: FeatureExtractor) -> Path:
    """Cache file of real-image statistics for a dataset key and a feature space."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{cache_key}__{extractor.name}")
    return Path(real_stats_cache) / f"fid_real_{safe}.safetensors"


def _save_real_stats(metric: FrechetInceptionDistance, path: Path) -> None:
    """Write the metric's accumulated real-feature sums, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: getattr(metric, name).detach().cpu().contiguous() for name in _REAL_STATES}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_real_stats(metric: FrechetInceptionDistance, path: Path) -> None:
    """Set the metric's real-feature sums from a cache file."""
    state = load_file(str(path))
    for name in _REAL_STATES:
        setattr(metric, name, state[name].to(getattr(metric, name).device))


def new_fid_metric(extractor: FeatureExtractor) -> FrechetInceptionDistance:
    """An empty ``FrechetInceptionDistance`` on ``extractor`` whose states are never synced implicitly.

    torchmetrics sums the states over ``torch.distributed`` inside ``compute()`` whenever a process
    group exists; that would also sum states that every process holds in full (cached real
    statistics, or a caller's unsharded images). Summing is therefore explicit:
    :func:`sum_fid_states`.
    """
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False)
    # compute() casts to the features' dtype, which update() records; a process that received no
    # images (fewer images than processes) must still be able to compute the summed result.
    metric.orig_dtype = torch.float32
    return metric


def update_fid(metric: FrechetInceptionDistance, images: ImagesLike, real: bool, batch_size: int = 256) -> int:
    """Add the features of ``images`` to the real or fake running sums, one batch at a time.

    Args:
        metric: from :func:`new_fid_metric`.
        images: uint8 (N, 3, H, W) tensor or iterable of such batches (a generator is consumed lazily,
            so no more than one batch needs to be in memory).
        real: update the real (True) or the fake (False) statistics.
        batch_size: at most this many images per feature-extractor call.

    Returns:
        The number of images added.
    """
    count = 0
    for batch in _batches(images, batch_size):
        metric.update(batch, real=real)
        count += batch.shape[0]
    return count


def sum_fid_states(metric: FrechetInceptionDistance, real: bool, accelerator) -> None:
    """Replace this process's real or fake sums (feature sum, outer-product sum, count) by their totals
    over all processes; nothing happens with one process (``accelerator`` None or a single process)."""
    names = _REAL_STATES if real else _FAKE_STATES
    summed = sum_over_processes({name: getattr(metric, name) for name in names}, accelerator)
    for name in names:
        setattr(metric, name, summed[name])


def accumulate_real_statistics(
    metric: FrechetInceptionDistance,
    real_images: Optional[ImagesLike],
    extractor: FeatureExtractor,
    batch_size: int = 256,
    real_stats_cache: Optional[Union[str, Path]] = None,
    cache_key: Optional[str] = None,
    accelerator=None,
) -> bool:
    """Fill the metric's real statistics from the cache, or from ``real_images`` (then cache them).

    With several processes each passes its own shard of the real images; the sums are added over
    processes, and the main process writes the cache. A cached file is used only when every process
    finds it, so that all take the same branch.

    Returns:
        True when the statistics came from the cache (``real_images`` was then not read).
    """
    path = None
    if real_stats_cache is not None:
        if cache_key is None:
            raise ValueError("real_stats_cache needs a cache_key naming the real dataset")
        path = _stats_path(real_stats_cache, cache_key, extractor)
    if path is not None and all_processes(path.exists(), accelerator):
        _load_real_stats(metric, path)
        return True
    if real_images is None:
        raise ValueError("real_images is None and no cached statistics were found")
    update_fid(metric, real_images, real=True, batch_size=batch_size)
    sum_fid_states(metric, real=True, accelerator=accelerator)
    if path is not None and (accelerator is None or accelerator.is_main_process):
        _save_real_stats(metric, path)
    return False


def fid_metric_report(
    metric: FrechetInceptionDistance, extractor: FeatureExtractor
) -> dict[str, Union[float, int, str]]:
    """``{"fid", "feature_extractor", "resize", "num_real", "num_fake"}`` of a metric holding the total sums."""
    return {
        "fid": float(metric.compute().item()),
        "feature_extractor": extractor.name,
        "resize": extractor.resize,
        "num_real": int(metric.real_features_num_samples.item()),
        "num_fake": int(metric.fake_features_num_samples.item()),
    }


def compute_fid(
    real_images: Optional[ImagesLike],
    fake_images: ImagesLike,
    extractor: FeatureExtractor,
    batch_size: int = 256,
    real_stats_cache: Optional[Union[str, Path]] = None,
    cache_key: Optional[str] = None,
    accelerator=None,
) -> float:
    """Fréchet distance between real and fake images in ``extractor``'s feature space.

    Args:
        real_images: uint8 (N, 3, H, W) tensor or iterable of such batches; may be None when
            cached statistics exist.
        fake_images: same for the generated images.
        extractor: a ``FeatureExtractor`` (``reference_extractor`` / ``inception_extractor``).
        batch_size: images per feature-extractor call.
        real_stats_cache: folder for cached real-image statistics (None: no cache).
        cache_key: names the real dataset (e.g. ``"embedded-test-r16-n2000"``); the file is
            keyed by it and the extractor's name.
        accelerator: None: the images are the whole sets. An ``accelerate.Accelerator``: each process
            passes its own shard of both sets (every process must call); the running sums are added
            over processes and every process returns the same value.
    """
    return fid_report(real_images, fake_images, extractor, batch_size, real_stats_cache, cache_key, accelerator)["fid"]


def fid_report(
    real_images: Optional[ImagesLike],
    fake_images: ImagesLike,
    extractor: FeatureExtractor,
    batch_size: int = 256,
    real_stats_cache: Optional[Union[str, Path]] = None,
    cache_key: Optional[str] = None,
    accelerator=None,
) -> dict[str, Union[float, int, str]]:
    """FID with the settings it was computed with (arguments as ``compute_fid``).

    Images are streamed through the feature extractor batch by batch into running sums; neither set
    is kept, so an iterable of batches (e.g. a generator producing them) bounds the memory.

    Returns:
        ``{"fid", "feature_extractor", "resize", "num_real", "num_fake"}`` (counts over all processes).
    """
    metric = new_fid_metric(extractor)
    accumulate_real_statistics(metric, real_images, extractor, batch_size, real_stats_cache, cache_key, accelerator)
    update_fid(metric, fake_images, real=False, batch_size=batch_size)
    sum_fid_states(metric, real=False, accelerator=accelerator)
    return fid_metric_report(metric, extractor)
