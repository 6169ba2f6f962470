"""Image–caption sets for retrieval: the COCO / Flickr30k Karpathy-split JSON and datasets with several captions per image.

Both readers return a ``datasets.Dataset`` whose image column is read on demand (wrap it in
:class:`~diffdis.eval.tasks.DatasetImages`) and ``captions[i]``, every caption of image i: retrieval counts any
of them as a hit for the image (CLIP_benchmark's rule, :func:`~diffdis.eval.zeroshot.retrieval_metrics`).

Karpathy-split files (``dataset_coco.json``, ``dataset_flickr30k.json``) look like::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                 "sentences": [{"raw": "A man riding a bike.", "tokens": [...]}, ...]}, ...]}

with ``split`` one of ``train``, ``restval``, ``val`` and ``test`` (the 5k COCO / 1k Flickr30k test images of
the papers) and ``filepath`` absent in Flickr30k; an image is at ``<images>/<filepath>/<filename>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple, Union

CAPTION_COLUMNS = ("captions", "caption", "text", "sentences")  # looked for in this order when none is named
SPLIT_ALIASES = {"validation": "val"}  # the datasets name of a split -> the Karpathy name


class CaptionSetError(ValueError):
    """A bad caption set: a missing or unreadable file, an unknown split or column, an image without captions."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CaptionSetError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise CaptionSetError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionSetError(f"{path}: expected a Karpathy-split file, an object with an 'images' list")
    return data


def _entry_captions(entry: dict, position: int, path: Path) -> List[str]:
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise CaptionSetError(f"{path}: image {position} ({entry.get('filename')!r}) has no 'sentences'")
    captions = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
    if not all(isinstance(c, str) for c in captions):
        raise CaptionSetError(f"{path}: image {position} ({entry.get('filename')!r}) has a sentence without a 'raw' string")
    return [c.strip() for c in captions]


def load_karpathy_split(
    path: Union[str, Path],
    split: str = "test",
    images: Optional[Union[str, Path]] = None,
    num_samples: Optional[int] = None,
):
    """The images and captions of one split of a Karpathy-split JSON file.

    Args:
        path: ``dataset_coco.json`` or ``dataset_flickr30k.json``.
        split: ``test``, ``val`` (or ``validation``), ``train`` or ``restval``.
        images: the folder the images' ``filepath/filename`` are relative to (default: the JSON file's folder).
        num_samples: keep only the first N images of the split.

    Returns:
        ``(dataset with an "image" column of file paths, captions)`` in the file's order.

    Raises:
        CaptionSetError: a missing or malformed file, a split without images, an image file that does not exist.
    """
    path = Path(path)
    data = _read_json(path)
    root = Path(images) if images is not None else path.parent
    if not root.is_dir():
        raise CaptionSetError(f"image folder {root} does not exist")
    wanted = SPLIT_ALIASES.get(split, split)
    entries = [e for e in data["images"] if isinstance(e, dict) and e.get("split") == wanted]
    if not entries:
        found = sorted({str(e.get("split")) for e in data["images"] if isinstance(e, dict)})
        raise CaptionSetError(f"{path} has no images in split '{wanted}'; it has: {', '.join(found) or 'none'}")
    entries = entries[:num_samples] if num_samples is not None else entries
    if any("filename" not in e for e in entries):
        raise CaptionSetError(f"{path}: every image needs a 'filename'")
    files = [root / e.get("filepath", "") / e["filename"] for e in entries]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CaptionSetError(f"{len(missing)} of {len(files)} images of split '{wanted}' are missing, e.g. {missing[0]}"
                              " (pass the folder they are in)")
    captions = [_entry_captions(e, i, path) for i, e in enumerate(entries)]
    return _path_dataset([str(f) for f in files]), captions


def _path_dataset(files: List[str]):
    import datasets

    return datasets.Dataset.from_dict({"image": files})


def caption_lists(dataset, column: Optional[str] = None) -> Tuple[str, List[List[str]]]:
    """Every image's captions from a column holding one caption or a list of them per row.

    Args:
        dataset: a ``datasets.Dataset`` (e.g. an imagefolder whose metadata.jsonl holds ``"caption": [...]``).
        column: the caption column; None takes the first of :data:`CAPTION_COLUMNS` the dataset has.

    Returns:
        ``(column, captions)``.

    Raises:
        CaptionSetError: no such column, a row with no caption, or a value that is not a string or a list of them.
    """
    if column is None:
        column = next((c for c in CAPTION_COLUMNS if c in dataset.column_names), None)
        if column is None:
            raise CaptionSetError(f"no caption column ({', '.join(CAPTION_COLUMNS)}); the dataset has: "
                                  f"{', '.join(dataset.column_names)}")
    elif column not in dataset.column_names:
        raise CaptionSetError(f"unknown caption column '{column}'; the dataset has: {', '.join(dataset.column_names)}")
    captions = []
    for i, value in enumerate(dataset[column]):
        caps = [value] if isinstance(value, str) else value
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise CaptionSetError(f"caption column '{column}' row {i}: expected a caption or a non-empty list of "
                                  f"captions, got {value!r}")
        captions.append([c.strip() for c in caps])
    return column, captions
