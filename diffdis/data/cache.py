"""A latent cache: every training image encoded once by a frozen VAE, stored as an HF dataset on disk.

A run on a pretrained VAE otherwise encodes every batch of every epoch. The cache keeps, per usable
example, the parameters of the VAE's latent distribution (diffusers' ``DiagonalGaussianDistribution``:
``mean`` and ``std``, float32 arrays (C, h, w)), the caption column(s) and the source index. The latent
is still *drawn* at every step, by :func:`sample_latents`, which returns bit for bit what encoding the
image would (same noise draw from the same generator), so a cached run trains as an uncached one.

Layout of a cache folder: a ``Dataset.save_to_disk`` folder (``datasets.load_from_disk`` reads it)
plus ``latent_cache.json``, the manifest: what the cache was built with (VAE config and weights hashes,
dtype, scaling factor, resolution, crop, source data) and counts (examples, unreadable ones skipped).
:func:`load_latent_cache` refuses a cache whose manifest differs from the expected one.

A build writes into ``.<name>.partial`` beside the target and renames it into place at the end, so an
interrupted build leaves no half-written cache (a killed one leaves only the hidden folder, which the
next build clears).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import torch

from diffdis.data.loading import PROCEDURAL_DATASETS
from diffdis.data.transforms import caption_options

logger = logging.getLogger("diffdis.data")

MANIFEST_NAME = "latent_cache.json"
CACHE_FORMAT = 1  # bump when the layout or the meaning of a column changes
LATENT_COLUMNS = ("mean", "std", "index")


# ----------------------------------------------------------------------------------------- manifest


def _digest() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=16)


def vae_config_hash(vae: torch.nn.Module) -> str:
    """Hash of the VAE's public config (keys not starting with "_"), independent of tuple/list spelling."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest = _digest()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def vae_weights_hash(vae: torch.nn.Module) -> str:
    """Hash of every tensor of the VAE's state dict (names, shapes and bytes, so the dtype counts too).

    Configs alone do not tell VAEs apart: SD-1.x's VAE and its fine-tuned ``sd-vae-ft-mse`` share one.
    About a second for the 84M parameters of SD's VAE.
    """
    digest = _digest()
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_cache_manifest(
    vae: torch.nn.Module,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings a latent cache depends on: what :func:`load_latent_cache` compares.

    Args:
        vae: the VAE that encodes (its config, weights and dtype are hashed).
        resolution, center_crop, random_flip: the collator's image settings.
        source: optional description of the source data (see :func:`data_source`), compared as well.
    """
    manifest = {
        "format": CACHE_FORMAT,
        "vae_class": type(vae).__name__,
        "vae_config_hash": vae_config_hash(vae),
        "vae_weights_hash": vae_weights_hash(vae),
        "vae_dtype": str(vae.dtype).removeprefix("torch."),
        "scaling_factor": float(vae.config.scaling_factor),
        "resolution": int(resolution),
        "center_crop": bool(center_crop),
        "random_flip": bool(random_flip),
    }
    if source is not None:
        manifest["source"] = dict(source)
    return _json_normal(manifest)


def data_source(data_cfg: Any) -> dict[str, Any]:
    """The fields of a ``data`` config section that pick the examples (name, split, columns, files).

    Local paths are made absolute, so a relative and an absolute spelling of one folder agree.
    """

    def _path(value: str | None) -> str | None:
        return os.path.abspath(value) if value and os.path.exists(value) else value

    files = list(data_cfg.data_files) if data_cfg.data_files else None
    procedural = data_cfg.name in PROCEDURAL_DATASETS  # drawn from the seed: its size and seed pick the examples
    return {
        "name": _path(data_cfg.name),
        "split": data_cfg.split,
        "image_column": data_cfg.image_column,
        "caption_column": data_cfg.caption_column,
        "data_dir": _path(data_cfg.data_dir),
        "data_files": [_path(f) for f in files] if files else None,
        "num_train_samples": data_cfg.num_train_samples if procedural else None,
        "seed": data_cfg.seed if procedural else None,
    }


def manifest_for_config(cfg: Any, vae: torch.nn.Module) -> dict[str, Any]:
    """The expected manifest of a run config's cache (``cfg.data`` image settings and source)."""
    d = cfg.data
    return latent_cache_manifest(vae, d.resolution, d.center_crop, d.random_flip, source=data_source(d))


def _json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(value, default=str))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the cache at ``path``.

    Raises:
        ValueError: no cache there, or its manifest is missing or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"no latent cache at '{path}' (build one with tools/cache.py)")
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"'{path}' is not a latent cache: it has no {MANIFEST_NAME}") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"latent cache '{path}' has a corrupt {MANIFEST_NAME} ({err}); rebuild it") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"latent cache '{path}' has a corrupt {MANIFEST_NAME} (not an object); rebuild it")
    return manifest


def check_manifest(found: Mapping[str, Any], expected: Mapping[str, Any], path: str | os.PathLike = "") -> None:
    """Raise a one-line ValueError naming every key of ``expected`` whose value ``found`` does not share."""
    expected = _json_normal(dict(expected))
    wrong = [f"{k}={found.get(k)!r} (expected {v!r})" for k, v in expected.items() if found.get(k) != v]
    if wrong:
        raise ValueError(
            f"latent cache '{path}' was built for other settings: {'; '.join(wrong)}. "
            "Rebuild it with tools/cache.py or drop data.cache_dir"
        )


# ----------------------------------------------------------------------------------------- sampling


def sample_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator | None,
    deterministic: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scaled latents (B, C, h, w) float32 drawn from cached distribution parameters.

    Bit for bit what ``vae.encode(x).latent_dist`` followed by ``sample(generator)`` (or ``mode()`` when
    deterministic) and ``* scaling_factor`` returns: the noise is diffusers' ``randn_tensor`` of the same
    shape, device and dtype, so it consumes the generator exactly as encoding would. Put ``mean`` and
    ``std`` on the device the VAE would have run on first.

    Args:
        mean, std: (B, C, h, w) cached parameters.
        scaling_factor: ``vae.config.scaling_factor``.
        generator: the generator the draw comes from (unused when deterministic).
        deterministic: return the mean (the distribution's ``deterministic`` flag).
        dtype: the VAE's dtype when it was not float32 (manifest ``vae_dtype``); default ``mean.dtype``.
    """
    from diffusers.utils.torch_utils import randn_tensor  # heavy import, only where latents are drawn

    dtype = dtype or mean.dtype
    mean = mean.to(dtype)  # (B, C, h, w)
    if deterministic:
        z = mean
    else:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=dtype)  # (B, C, h, w)
        z = mean + std.to(dtype) * noise
    return (z * scaling_factor).float()  # (B, C, h, w)


# ------------------------------------------------------------------------------------------ collate


def _example_options(example: Mapping[str, Any], caption_key: str, captions_key: str | None) -> list[str]:
    """The caption options of one example: every phrasing where ``captions_key`` has some (as the collator)."""
    if captions_key and example.get(captions_key):
        options = caption_options(example[captions_key])
        if options:
            return options
    return caption_options(example.get(caption_key))


class LatentCacheCollator:
    """Collate rows of a latent cache into a batch, in place of ``ImageTextCollator(defer_choice=True)``.

    Output: ``latent_mean`` and ``latent_std`` (B, C, h, w) float32, ``index`` (B,) long (rows of the
    source dataset) and ``caption_options`` (list of B lists of str) for :func:`choose_captions`.

    Args:
        caption_key: column with one caption (or a list) per example.
        captions_key: optional column with every phrasing, preferred where present and non-empty.
        deterministic: the cache's VAE distribution is deterministic (manifest ``deterministic``); passed on in
            every batch as ``deterministic`` for :func:`sample_latents`.
    """

    def __init__(self, caption_key: str = "caption", captions_key: str | None = "captions", deterministic: bool = False) -> None:
        self.caption_key = caption_key
        self.captions_key = captions_key
        self.deterministic = deterministic

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {
            "latent_mean": torch.stack([torch.as_tensor(e["mean"]) for e in examples]),  # (B, C, h, w)
            "latent_std": torch.stack([torch.as_tensor(e["std"]) for e in examples]),  # (B, C, h, w)
            "index": torch.as_tensor([int(e["index"]) for e in examples], dtype=torch.long),  # (B,)
            "caption_options": [_example_options(e, self.caption_key, self.captions_key) for e in examples],
            "deterministic": self.deterministic,
        }


# -------------------------------------------------------------------------------------------- build


@dataclass
class _Settings:
    """What the build reads off the image collator."""

    resolution: int
    center_crop: bool
    random_flip: bool
    caption_key: str
    captions_key: str | None


def _collator_settings(collate_fn: Callable) -> _Settings:
    resolution = getattr(collate_fn, "resolution", None)
    if not isinstance(resolution, int):
        raise ValueError("collate_fn must expose its image settings (resolution, center_crop): pass an ImageTextCollator")
    settings = _Settings(
        resolution,
        bool(getattr(collate_fn, "center_crop", True)),
        bool(getattr(collate_fn, "random_flip", False)),
        getattr(collate_fn, "caption_key", "caption"),
        getattr(collate_fn, "captions_key", "captions"),
    )
    if not settings.center_crop or settings.random_flip:
        logger.warning("random crops/flips are drawn once and frozen into the latent cache")
    return settings


class _IndexedRows(torch.utils.data.Dataset):
    """Rows ``start..stop`` of a map-style dataset, each as (source index, example)."""

    def __init__(self, dataset: datasets.Dataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return self.start + i, self.dataset[self.start + i]


class _DecodeEach:
    """DataLoader collate: the image collator on one example at a time, so skipped examples are known."""

    def __init__(self, collate_fn: Callable, caption_columns: Sequence[str]) -> None:
        self.collate_fn, self.caption_columns = collate_fn, list(caption_columns)

    def __call__(self, items: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
        kept, pixels = [], []
        captions: dict[str, list] = {c: [] for c in self.caption_columns}
        for index, example in items:
            batch = self.collate_fn([example])
            if batch is None:  # unreadable image or empty caption; the collator logs it
                continue
            kept.append(index)
            pixels.append(batch["pixel_values"])  # (1, 3, H, W)
            for column in self.caption_columns:
                captions[column].append(example[column])
        return {
            "index": kept,
            "pixel_values": torch.cat(pixels) if pixels else None,  # (B', 3, H, W)
            "captions": captions,
            "num_skipped": len(items) - len(kept),
        }


@torch.no_grad()
def _encode(vae: torch.nn.Module, pixel_values: torch.Tensor, device: torch.device | str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Latent distribution parameters, as the trainer's encoding computes them: mean, std (B, C, h, w), deterministic."""
    dist = vae.encode(pixel_values.to(device).to(vae.dtype)).latent_dist
    return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy(), bool(dist.deterministic)


def _features(dataset: datasets.Dataset, caption_columns: Sequence[str], latent_shape: Sequence[int]) -> datasets.Features:
    array = datasets.Array3D(shape=tuple(latent_shape), dtype="float32")
    features = datasets.Features({"index": datasets.Value("int64"), "mean": array, "std": array})
    for column in caption_columns:
        source = dataset.features.get(column) if dataset.features is not None else None
        features[column] = source if source is not None else datasets.Value("string")
    return features


@dataclass
class _Job:
    """One rank's share of a build."""

    dataset: datasets.Dataset
    collate_fn: Callable
    vae: torch.nn.Module
    device: torch.device | str
    batch_size: int
    num_workers: int
    caption_columns: list[str]
    progress: bool


def _rows(job: _Job, start: int, stop: int, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Cache rows of source examples ``start..stop``, in order; skipped examples are counted in ``counts``."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        _IndexedRows(job.dataset, start, stop), batch_size=job.batch_size, shuffle=False,
        num_workers=job.num_workers, collate_fn=_DecodeEach(job.collate_fn, job.caption_columns),
    )
    with tqdm(total=stop - start, desc="encoding", unit="img", disable=not job.progress) as bar:
        for batch in loader:
            counts["skipped"] += batch["num_skipped"]
            if batch["index"]:
                mean, std, _ = _encode(job.vae, batch["pixel_values"], job.device)  # (B', C, h, w) each
                for i, index in enumerate(batch["index"]):
                    row = {"index": index, "mean": mean[i], "std": std[i]}
                    yield row | {c: batch["captions"][c][i] for c in job.caption_columns}
            bar.update(len(batch["index"]) + batch["num_skipped"])


def _encode_shard(job: _Job, features: datasets.Features, start: int, stop: int, work: Path) -> dict[str, Any]:
    """Encode one contiguous shard into ``work`` (an arrow file written by ``Dataset.from_generator``).

    Returns the shard's record: its arrow files and skip count.
    """
    counts = {"skipped": 0}
    try:
        part = datasets.Dataset.from_generator(
            _rows, features=features, cache_dir=str(work),
            gen_kwargs={"job": job, "start": start, "stop": stop, "counts": counts},
            fingerprint=uuid.uuid4().hex,  # a fresh id: no hashing of the VAE, no reuse of an older build
        )
    except datasets.exceptions.DatasetGenerationError as err:
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None  # the encoding's own error, not the writer's wrapper
    return {"files": [f["filename"] for f in part.cache_files], "num_examples": len(part), "num_skipped": counts["skipped"]}


def _shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous shard ``rank`` of ``n`` examples over ``world`` processes (sizes differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


def _merge_and_publish(tmp: Path, out_dir: Path, world: int, manifest: dict[str, Any], overwrite: bool) -> None:
    """Concatenate the ranks' shards in order, save them with the manifest, and rename into ``out_dir``."""
    records = [json.loads((tmp / f"part-{r:05d}.json").read_text()) for r in range(world)]
    parts = [datasets.Dataset.from_file(f) for rec in records for f in rec["files"]]
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    manifest = manifest | {
        "num_examples": len(merged),
        "num_skipped": sum(rec["num_skipped"] for rec in records),
    }
    if manifest["num_examples"] == 0:
        raise ValueError(f"no usable example in the dataset ({manifest['num_skipped']} skipped): nothing to cache")
    staged = tmp / "cache"
    merged.save_to_disk(str(staged))
    (staged / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    del merged, parts
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"'{out_dir}' already exists; pass overwrite=True (--overwrite) to replace it")
        os.replace(out_dir, tmp / "previous")
    os.replace(staged, out_dir)  # the cache appears complete, or not at all
    logger.info("latent cache: %d examples (%d skipped) written to %s", manifest["num_examples"], manifest["num_skipped"], out_dir)


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def _probe(vae: torch.nn.Module, resolution: int, device: torch.device | str) -> tuple[list[int], bool]:
    """Latent shape (C, h, w) and the distribution's deterministic flag, from one blank image."""
    mean, _, deterministic = _encode(vae, torch.zeros(1, 3, resolution, resolution), device)
    return list(mean.shape[1:]), deterministic


def build_latent_cache(
    dataset: datasets.Dataset,
    collate_fn: Callable,
    vae: torch.nn.Module,
    out_dir: str | os.PathLike,
    batch_size: int,
    device: torch.device | str,
    accelerator: Any = None,
    *,
    source: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Encode every usable example of ``dataset`` once and write the latent cache to ``out_dir``.

    Examples are read in order, decoded and cropped by ``collate_fn`` one at a time (those it drops,
    unreadable images or empty captions, are skipped and counted), encoded in batches with no grad,
    and written with their caption column(s) and source index. With several processes, each rank
    encodes a contiguous shard and rank 0 merges them in order (``out_dir`` on a shared filesystem);
    call it on every rank. As with any collective, an error on one rank leaves the others waiting.

    Args:
        dataset: a map-style dataset with "image" (``Image(decode=False)``) and caption column(s).
        collate_fn: an ``ImageTextCollator``, best with ``defer_choice=True`` (no tokenizing); its
            resolution, crop and caption keys are recorded. Examples it drops (unreadable image,
            empty caption) are counted in the manifest's ``num_skipped``.
        vae: the frozen VAE (``AutoencoderKL``), already on ``device``.
        out_dir: the cache folder to create.
        batch_size: images per VAE call.
        device: where pixels go for encoding (``accelerator.device`` when distributed).
        accelerator: an ``accelerate.Accelerator`` (or anything with ``num_processes``,
            ``process_index``, ``is_main_process`` and ``wait_for_everyone()``); None: one process.
        source: description of the source data stored in the manifest and compared on load
            (:func:`data_source` of the data config).
        num_workers: DataLoader workers that decode images.
        overwrite: replace an existing cache at ``out_dir``.
        progress: show a progress bar (on the main process).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: the collator exposes no settings, or no example is usable.
    """
    out_dir = Path(out_dir).absolute()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    main = rank == 0
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"'{out_dir}' already exists; pass overwrite=True (--overwrite) to replace it")
    settings = _collator_settings(collate_fn)
    caption_columns = [c for c in (settings.caption_key, settings.captions_key) if c and c in dataset.column_names]
    if not caption_columns:
        raise ValueError(f"dataset has no caption column {settings.caption_key!r}; columns: {dataset.column_names}")
    latent_shape, deterministic = _probe(vae, settings.resolution, device)
    manifest = latent_cache_manifest(vae, settings.resolution, settings.center_crop, settings.random_flip, source)
    manifest |= {"latent_shape": latent_shape, "deterministic": deterministic,
                 "caption_columns": caption_columns, "num_source_examples": len(dataset)}

    tmp = _partial_dir(out_dir)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build
        tmp.mkdir(parents=True)
    _barrier(accelerator, world)
    try:
        job = _Job(dataset, collate_fn, vae, device, batch_size, num_workers, caption_columns, progress and main)
        start, stop = _shard_bounds(len(dataset), world, rank)
        record = _encode_shard(job, _features(dataset, caption_columns, latent_shape), start, stop, tmp / f"hf-{rank:05d}")
        (tmp / f"part-{rank:05d}.json").write_text(json.dumps(record), encoding="utf-8")
        _barrier(accelerator, world)
        if main:
            _merge_and_publish(tmp, out_dir, world, manifest, overwrite)
        _barrier(accelerator, world)
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _barrier(accelerator: Any, world: int) -> None:
    if accelerator is not None and world > 1:
        accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------- load


def load_latent_cache(path: str | os.PathLike, expected_manifest: Mapping[str, Any]) -> datasets.Dataset:
    """Open the latent cache at ``path``, checking it was built with ``expected_manifest``'s settings.

    Args:
        path: a folder written by :func:`build_latent_cache`.
        expected_manifest: the settings to match, e.g. :func:`manifest_for_config` or
            :func:`latent_cache_manifest`; every key given must hold the same value in the cache's manifest.

    Returns:
        A ``datasets.Dataset`` with "mean", "std" (float32 tensors (C, h, w)) and "index" in the torch
        format; caption columns stay Python objects. Collate it with :class:`LatentCacheCollator`.

    Raises:
        ValueError: one line: no cache at ``path``, a missing or corrupt manifest or data, or settings
            that differ from ``expected_manifest``.
    """
    manifest = read_manifest(path)
    check_manifest(manifest, expected_manifest, path)
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - missing files, bad arrow, bad JSON: all mean "rebuild"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"latent cache '{path}' is corrupt ({first}); rebuild it") from None
    if not isinstance(dataset, datasets.Dataset) or not set(LATENT_COLUMNS) <= set(dataset.column_names):
        raise ValueError(f"latent cache '{path}' is corrupt (columns {LATENT_COLUMNS} missing); rebuild it")
    if len(dataset) != manifest.get("num_examples"):
        raise ValueError(
            f"latent cache '{path}' is corrupt ({len(dataset)} rows, manifest says {manifest.get('num_examples')}); rebuild it"
        )
    dataset.set_format("torch", columns=list(LATENT_COLUMNS), output_all_columns=True)
    return dataset
