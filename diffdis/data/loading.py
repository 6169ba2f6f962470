"""Load an image-text dataset (embedded, local imagefolder, webdataset shards, hub or script)
and rename it to the columns "image" and "caption" that the collator reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import datasets

from diffdis.data.compositional import make_compositional_dataset
from diffdis.data.embedded import make_embedded_dataset

logger = logging.getLogger("diffdis.data")

AnyDataset = datasets.Dataset | datasets.IterableDataset
DataFiles = str | Sequence[str] | dict[str, str | Sequence[str]]

# Where the default column names are absent, these are tried in order (webdataset keys first).
_IMAGE_ALIASES: tuple[str, ...] = ("image", "jpg", "jpeg", "png", "webp", "img")
_CAPTION_ALIASES: tuple[str, ...] = ("text", "caption", "txt", "captions")
_DEFAULT_IMAGE_COLUMN = "image"
_DEFAULT_CAPTION_COLUMN = "text"
_METADATA_FILES: tuple[str, ...] = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# Datasets drawn in memory from (split, num_samples, resolution, seed); their caption column is "caption".
PROCEDURAL_DATASETS: tuple[str, ...] = ("embedded", "compositional")


def _has_metadata(folder: str) -> bool:
    """True if ``folder`` or one of its sub-folders (splits) holds an imagefolder metadata file."""
    for _, _, files in os.walk(folder):
        if any(name in files for name in _METADATA_FILES):
            return True
    return False


def _column_names(dataset: AnyDataset) -> list[str]:
    """Column names, peeking at the first example of a stream whose features are unknown."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    if dataset.features is not None:
        return list(dataset.features)
    first = next(iter(dataset), None)
    return [] if first is None else list(first)


def _resolve_column(requested: str, default: str, aliases: Sequence[str], existing: list[str],
                    role: str, name: str) -> str:
    """The existing column for ``requested``; default names fall back to common aliases."""
    if requested in existing:
        return requested
    if requested == default:
        for alias in aliases:
            if alias in existing:
                logger.info("dataset %s: using column %r as the %s", name, alias, role)
                return alias
    raise ValueError(
        f"dataset {name!r} has no {role} column {requested!r}; "
        f"existing columns: {existing}. Set the {role} column to one of them."
    )


def _split_files(data_files: DataFiles, split: str) -> dict[str, str | Sequence[str]]:
    if isinstance(data_files, dict):
        return data_files
    return {split: data_files}


def _is_empty_metadata(path: str) -> bool:
    """True if an imagefolder metadata file holds no records (blank, or a csv header alone)."""
    if os.path.getsize(path) == 0:
        return True
    if path.endswith(".parquet"):
        return False  # a non-empty parquet file: let datasets judge it
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    return len(lines) < (2 if path.endswith(".csv") else 1)


def _empty_metadata_files(folder: str) -> list[str]:
    """The metadata files under ``folder`` that hold no records, sorted."""
    return sorted(
        os.path.join(root, name)
        for root, _, files in os.walk(folder)
        for name in files
        if name in _METADATA_FILES and _is_empty_metadata(os.path.join(root, name))
    )


def _load_imagefolder(folder: str, split: str, streaming: bool) -> AnyDataset:
    """``load_dataset("imagefolder")`` on a folder with metadata; an empty metadata file (which
    ``datasets`` reports as an IndexError or an unrelated ValueError) is a ValueError naming it."""
    try:
        return datasets.load_dataset("imagefolder", data_dir=folder, split=split, streaming=streaming)
    except (IndexError, ValueError) as err:
        empty = _empty_metadata_files(folder)
        if not empty:
            raise
        raise ValueError(
            f"metadata file '{empty[0]}' of dataset folder '{folder}' has no records: "
            "it needs one per image, with its file_name and caption"
        ) from err


def _load_raw(name: str, split: str, data_dir: str | None, data_files: DataFiles | None,
              streaming: bool) -> AnyDataset:
    """Dispatch ``name`` to the right ``datasets.load_dataset`` call."""
    if name == "webdataset":
        if not data_files:
            raise ValueError("name='webdataset' needs data_files (shard paths or globs of .tar)")
        return datasets.load_dataset(
            "webdataset", data_files=_split_files(data_files, split), split=split, streaming=True
        )
    folder = data_dir if name == "imagefolder" else name
    if folder is not None and os.path.isdir(folder) and _has_metadata(folder):
        return _load_imagefolder(folder, split, streaming)
    if name == "imagefolder" and data_files:
        return datasets.load_dataset(
            "imagefolder", data_files=_split_files(data_files, split), split=split,
            streaming=streaming,
        )
    return datasets.load_dataset(
        name, split=split, data_dir=data_dir, data_files=data_files, streaming=streaming
    )


def _rename(dataset: AnyDataset, source: str, target: str, existing: list[str]) -> AnyDataset:
    if source == target:
        return dataset
    if target in existing:  # e.g. caption_column="text" while a different "caption" exists
        dataset = dataset.remove_columns(target)
    return dataset.rename_column(source, target)


def _undecoded_images(dataset: AnyDataset, column: str) -> AnyDataset:
    """Cast ``column`` to Image(decode=False), so decoding (and replacing corrupt files) happens in the
    collator; left as is where the feature is unknown or not an image. Done before any rename: a streamed
    dataset's rename is a map that would decode (and fail on) every image first."""
    features = dataset.features
    if features is not None and isinstance(features.get(column), datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def load_image_text_dataset(
    name: str,
    split: str = "train",
    image_column: str = _DEFAULT_IMAGE_COLUMN,
    caption_column: str = _DEFAULT_CAPTION_COLUMN,
    data_dir: str | None = None,
    data_files: DataFiles | None = None,
    streaming: bool = False,
    resolution: int = 16,
    seed: int = 0,
    num_samples: int | None = None,
) -> AnyDataset:
    """Load an image-text dataset with its columns renamed to "image" and "caption".

    Args:
        name: "embedded" or "compositional" (the procedural shapes data; ``resolution`` and ``seed``
            apply, the caption column is always "caption"); a local folder with ``metadata.jsonl`` /
            ``.csv`` (or "imagefolder" with ``data_dir``); "webdataset" with ``data_files``
            (.tar shards, always streamed); anything else goes to ``datasets.load_dataset``
            (hub id, local script or packaged builder).
        split: split to load.
        image_column: image column; with the default "image", webdataset keys such as "jpg"
            or "png" are also tried.
        caption_column: caption column; with the default "text", "caption" and "txt" are also
            tried. A column may hold a list of captions per image.
        data_dir, data_files: passed to ``datasets.load_dataset``.
        streaming: return an IterableDataset.
        num_samples: keep only the first ``num_samples`` examples.

    Returns:
        A Dataset or IterableDataset with "image" (``Image(decode=False)`` where the feature
        is known) and "caption" columns, plus any other columns of the source.

    Raises:
        ValueError: a column is missing (the message lists the columns that exist), or a
            metadata file of a local folder has no records (the message names it).
    """
    if name in PROCEDURAL_DATASETS:
        make = make_embedded_dataset if name == "embedded" else make_compositional_dataset
        dataset: AnyDataset = make(split, num_samples, resolution, seed)
        caption_column = "caption"
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset = _load_raw(name, split, data_dir, data_files, streaming)
        if num_samples is not None:
            if isinstance(dataset, datasets.IterableDataset):
                dataset = dataset.take(num_samples)
            else:
                dataset = dataset.select(range(min(num_samples, len(dataset))))

    existing = _column_names(dataset)
    image_source = _resolve_column(
        image_column, _DEFAULT_IMAGE_COLUMN, _IMAGE_ALIASES, existing, "image", name
    )
    caption_source = _resolve_column(
        caption_column, _DEFAULT_CAPTION_COLUMN, _CAPTION_ALIASES, existing, "caption", name
    )
    dataset = _undecoded_images(dataset, image_source)
    dataset = _rename(dataset, image_source, "image", existing)
    return _rename(dataset, caption_source, "caption", _column_names(dataset))
