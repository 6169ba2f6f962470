"""What an evaluation runs on: zero-shot tasks, retrieval captions and FID reference sets, with images read on demand.

Every loader here raises :class:`EvaluationError` (one line naming the bad input) for data a user got
wrong: a missing split or column, class names that do not fit the labels, an unreadable image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import zeroshot as zs
from .suite import LazyImages


class EvaluationError(ValueError):
    """A bad evaluation input (dataset, column, class names, reference set): reported as one line."""


class ZeroShotTask(NamedTuple):
    """One classification task: the labels of the evaluated images and the text side that names the classes."""

    labels: torch.Tensor  # (N,) class ids, in the order of ``classnames``
    classnames: List[str]
    templates: List[str]  # each with one "{}"


class DatasetImages:
    """The images of a dataset column as model inputs, decoded only when a batch asks for them.

    ``len(images)`` and ``images[indices]`` (a list of item indices) -> pixel values (b, 3, R, R) in
    [-1, 1], resized and centre-cropped to ``resolution``, like a (N, 3, R, R) tensor indexed by a list.

    Args:
        dataset: a ``datasets.Dataset``.
        column: its image column.
        resolution: side length of the model's input images.
    """

    def __init__(self, dataset, column: str, resolution: int) -> None:
        self.dataset = dataset
        self.column = column
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: List[int]) -> torch.Tensor:
        from ..data.transforms import decode_image, resize_and_crop, to_pixel_values

        rows = self.dataset.select(indices)[self.column]
        images = [decode_image(v) for v in rows]
        if any(im is None for im in images):
            raise EvaluationError(f"an image of items {indices[0]}..{indices[-1]} cannot be decoded")
        return torch.stack([to_pixel_values(resize_and_crop(im.convert("RGB"), self.resolution)) for im in images])


Images = Union[torch.Tensor, DatasetImages]  # (N, 3, R, R) in [-1, 1] held in memory, or read on demand


# ---------------------------------------------------------------------------- zero-shot classification
def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_hf_dataset(name: str, split: str):
    """A split of a hub dataset, a saved dataset, a folder of webdataset shards, or an imagefolder."""
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and _is_saved_dataset(path):
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise ValueError(f"no split '{split}'; it has: {', '.join(saved)}")
                return saved[split]
            return saved
        if path.is_dir() and (any(path.glob("*.tar")) or any(path.glob("*/*.tar"))):  # e.g. a clip-benchmark/wds_* copy
            return datasets.load_dataset("webdataset", data_dir=str(path), split=split)
        if path.is_dir():  # class subfolders (labels from folder names) or imagefolder with metadata
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        return datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise EvaluationError(f"cannot load dataset '{name}' split '{split}': {str(err).splitlines()[0]}") from None


def _check_column(dataset, column: str, kind: str) -> None:
    if column not in dataset.column_names:
        raise EvaluationError(f"unknown {kind} column '{column}'; the dataset has: {', '.join(dataset.column_names)}")


def _image_column(dataset, column: Optional[str]) -> str:
    """``column``, or (None) ``image`` when present, else the dataset's only image column (webdataset: ``webp``...)."""
    import datasets

    if column is not None or "image" in dataset.column_names:
        return column or "image"
    found = [k for k, f in dataset.features.items() if isinstance(f, datasets.Image)]
    return found[0] if len(found) == 1 else "image"


def _classnames_for(dataset, task: str, label_column: str, classnames: Optional[str],
                    templates: Optional[str]) -> Tuple[Optional[List[str]], List[str]]:
    """Class names (file > built-in task > ClassLabel feature; None without any of them) and templates."""
    names, chosen = None, ["a photo of a {}."]
    if task not in ("auto", "all"):
        names, chosen = zs.load_task(task)
    feature = dataset.features.get(label_column)
    if classnames:
        names = zs.load_classnames_file(classnames)
    elif names is None and getattr(feature, "num_classes", None) is not None:
        names = list(feature.names)
    if templates:
        chosen = zs.load_templates_file(templates)
    return names, chosen


def _index_names(feature) -> bool:
    """A ClassLabel whose names are the class indices 0..C-1 (folders named by index, sorted as strings)."""
    names = getattr(feature, "names", None) or []
    return all(n.isdigit() for n in names) and sorted(int(n) for n in names) == list(range(len(names)))


def _label_ids(dataset, column: str, names: Optional[List[str]]) -> torch.Tensor:
    """Class ids of ``column``: a ClassLabel or integers as they are, strings mapped to their index in ``names``.

    A ClassLabel named by class indices (folders ``0``, ``1``, ..., ``10``, which an imagefolder sorts as strings)
    gives the index its name states, not its position.
    """
    import datasets

    feature = dataset.features.get(column)
    dtype = getattr(feature, "dtype", "")
    if isinstance(feature, datasets.ClassLabel) and _index_names(feature):
        by_name = torch.tensor([int(n) for n in feature.names])
        return by_name[torch.tensor(dataset[column]).long()]
    if isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value) and dtype.startswith(("int", "uint"))):
        return torch.tensor(dataset[column]).long()
    strings = isinstance(feature, datasets.Value) and dtype in ("string", "large_string")
    if strings and names is not None:
        return _ids_from_names(dataset[column], names, column)
    hint = " (or strings naming the classes, with --classnames FILE or a built-in --task)" if strings else ""
    raise EvaluationError(f"label column '{column}' holds {feature}: it must hold integer class ids or a ClassLabel{hint}")


def _ids_from_names(values: Sequence, names: List[str], column: str) -> torch.Tensor:
    """String labels -> their index in ``names``; a label that is not a class name is an :class:`EvaluationError`."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({v for v in values if v not in index}, key=str)
    if unknown:
        raise EvaluationError(f"label column '{column}' holds {len(unknown)} label(s) that are not among the "
                              f"{len(names)} class names, e.g. {unknown[0]!r}")
    return torch.tensor([index[v] for v in values], dtype=torch.long)


def normalise_classname(name: str) -> str:
    """A class name as compared with a dataset's ClassLabel: camelCase split, lower case, punctuation, ``_`` and
    ``-`` as spaces, single spaces (``"SeaLake"`` -> ``"sea lake"``, ``"kite (bird of prey)"`` -> ``"kite bird of prey"``)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return " ".join(re.sub(r"[^\w\s']|_", " ", spaced.lower()).split())


def same_class(ours: str, theirs: str) -> bool:
    """Whether a prompt class name names a dataset's ClassLabel name: equal after :func:`normalise_classname`, or
    the words of one contained in the words of the other, for any of the ClassLabel's comma-separated synonyms
    (``"tench"`` and ``"tench, Tinca tinca"``; ``"annual crop land"`` and ``"AnnualCrop"``)."""
    mine = set(normalise_classname(ours).split())
    for synonym in theirs.split(","):
        words = set(normalise_classname(synonym).split())
        if words and mine and (words <= mine or mine <= words):
            return True
    return False


def check_class_order(names: Sequence[str], dataset_names: Sequence[str], column: str = "label") -> None:
    """Refuse class names that do not follow a ClassLabel's order, name by name (:func:`same_class`).

    A list in another order would score every image against the wrong class names and give a wrong accuracy
    without any other sign.

    Raises:
        EvaluationError: naming the first position where the two lists differ.
    """
    if len(names) != len(dataset_names):
        raise EvaluationError(f"{len(names)} class names given but the label column declares {len(dataset_names)} classes")
    for i, (ours, theirs) in enumerate(zip(names, dataset_names)):
        if not same_class(ours, theirs):
            raise EvaluationError(
                f"class names out of the dataset's order: class {i} is {ours!r} in the class names but {theirs!r} in "
                f"the ClassLabel of column '{column}'; give the names in the dataset's label order")


def _check_classes(dataset, column: str, names: Optional[List[str]], labels: torch.Tensor) -> List[str]:
    """The class names, checked against the ClassLabel's names (or its number of classes) and the range of the labels."""
    if names is None:
        raise EvaluationError(f"no class names: column '{column}' is not a ClassLabel; pass --classnames FILE")
    feature = dataset.features.get(column)
    declared = getattr(feature, "num_classes", None)
    if declared is not None and len(names) != declared:
        raise EvaluationError(f"{len(names)} class names given but the label column declares {declared} classes")
    if declared is not None and not _index_names(feature):
        check_class_order(names, feature.names, column)
    if int(labels.max()) >= len(names) or int(labels.min()) < 0:
        raise EvaluationError(
            f"{len(names)} class names given but the labels range over {int(labels.min())}..{int(labels.max())}"
        )
    return names


def default_dataset(task: str) -> str:
    """The dataset a task runs on when none is named: a benchmark's hub dataset, else ``"embedded"``."""
    bench = zs.benchmark_dataset(task) if task in zs.task_names() else None
    return bench.hub if bench is not None else "embedded"


def load_zero_shot_tasks(
    dataset: Optional[str] = None,
    task: str = "all",
    split: Optional[str] = None,
    num_samples: Optional[int] = None,
    resolution: int = 16,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    classnames: Optional[str] = None,
    templates: Optional[str] = None,
) -> Tuple[DatasetImages, Dict[str, ZeroShotTask]]:
    """The images and tasks of a zero-shot classification run.

    Args:
        dataset: ``"embedded"``, a hub dataset name, a local folder (class subfolders, an imagefolder, webdataset
            shards or a saved dataset), or None: the hub dataset of a benchmark ``task``
            (:func:`~diffdis.eval.zeroshot.benchmark_dataset`), else ``"embedded"``.
        task: embedded: ``shape``, ``colour``, ``colour_shape`` or ``all``; other datasets: a built-in task
            whose class names and templates to use (:func:`~diffdis.eval.zeroshot.task_names`), or ``auto``.
        split: the split (default: the benchmark's, else ``test``; a plain folder without ``test/`` loads as one
            ``train`` split).
        num_samples: keep only the first N images.
        resolution: the model's input size.
        image_column: default ``image``, or the dataset's only image column.
        label_column: default ``label``, or the benchmark's label column when the dataset has no ``label``.
        classnames, templates: files that override the class names and templates.

    Returns:
        ``(images, {task name: ZeroShotTask})``; the embedded ``all`` gives its three tasks on the same images.

    Raises:
        EvaluationError: a missing split or column, or class names that do not fit the labels: a count that
        differs, or (for a ClassLabel) a name that differs at some position (:func:`check_class_order`).
    """
    bench = zs.benchmark_dataset(task) if task in zs.task_names() else None
    dataset = dataset or default_dataset(task)
    chosen_split = split or (bench.split if bench is not None else "test")
    if Path(dataset).is_dir() and split is None and not (Path(dataset) / chosen_split).is_dir() \
            and not _is_saved_dataset(Path(dataset)):
        chosen_split = "train"  # a plain folder of class subfolders loads as one "train" split
    if dataset == "embedded":
        from ..data.embedded import make_embedded_dataset

        data = make_embedded_dataset(chosen_split, num_samples, resolution=resolution)
        names = list(zs.EMBEDDED_TASKS) if task == "all" else [task]
        if any(n not in zs.EMBEDDED_TASKS for n in names):
            raise EvaluationError(f"unknown embedded task '{task}'; choose shape, colour, colour_shape, all or retrieval")
        if len(data) == 0:
            raise EvaluationError("the dataset is empty")
        tasks = {n: ZeroShotTask(zs.embedded_labels(data, n), *zs.load_task(n)) for n in names}
        return DatasetImages(data, "image", resolution), tasks
    if dataset == "compositional":  # tasks of diffdis.eval.compositional.COMPOSITIONAL_TASKS, each on its own images
        from .compositional import load_compositional_tasks

        data, tasks = load_compositional_tasks(task, chosen_split, num_samples, resolution)
        return DatasetImages(data, "image", resolution), tasks
    data = _load_hf_dataset(dataset, chosen_split)
    if num_samples is not None:
        data = data.select(range(min(num_samples, len(data))))
    image_column = _image_column(data, image_column)
    if label_column is None:
        label_column = "label" if "label" in data.column_names or bench is None else bench.label_column
    _check_column(data, image_column, "image")
    _check_column(data, label_column, "label")
    if len(data) == 0:
        raise EvaluationError("the dataset is empty")
    names, chosen = _classnames_for(data, task, label_column, classnames, templates)
    labels = _label_ids(data, label_column, names)
    names = _check_classes(data, label_column, names, labels)
    name = task if task not in ("auto", "all") else Path(dataset).name
    return DatasetImages(data, image_column, resolution), {name: ZeroShotTask(labels, names, chosen)}


# ---------------------------------------------------------------------------- retrieval
def load_retrieval_set(
    split: str = "validation",
    num_samples: Optional[int] = None,
    resolution: int = 16,
    dataset: Optional[str] = None,
    images: Optional[str] = None,
    caption_column: Optional[str] = None,
    image_column: Optional[str] = None,
) -> Tuple[DatasetImages, List[List[str]]]:
    """Images and every caption of each image (all of them count as its captions).

    Args:
        split: the split (a Karpathy file: ``test``, ``val``, ``train`` or ``restval``).
        num_samples: keep only the first N images.
        resolution: the model's input size.
        dataset: None or ``"embedded"`` (every phrasing of the embedded captions), a COCO / Flickr30k
            Karpathy-split ``.json`` file (:func:`~diffdis.eval.captions.load_karpathy_split`), or a hub dataset,
            imagefolder or saved dataset whose caption column holds one caption or a list per image.
        images: the image folder of a Karpathy file (default: the file's folder).
        caption_column: default: the first of ``captions``, ``caption``, ``text``, ``sentences``.
        image_column: default ``image``, or the dataset's only image column.

    Raises:
        EvaluationError: a missing file, split or column, an image without captions, an empty set.
    """
    from . import captions as cap

    try:
        if dataset in (None, "embedded"):
            from ..data.embedded import make_embedded_dataset

            data, column = make_embedded_dataset(split, num_samples, resolution=resolution), "image"
            texts = [list(c) for c in data["captions"]]
        elif str(dataset).endswith(".json"):
            (data, texts), column = cap.load_karpathy_split(dataset, split, images, num_samples), "image"
        else:
            if Path(dataset).is_dir() and not (Path(dataset) / split).is_dir() and not _is_saved_dataset(Path(dataset)):
                split = "train"  # a plain imagefolder loads as one "train" split
            data = _load_hf_dataset(dataset, split)
            if num_samples is not None:
                data = data.select(range(min(num_samples, len(data))))
            column = _image_column(data, image_column)
            _check_column(data, column, "image")
            texts = cap.caption_lists(data, caption_column)[1]
    except cap.CaptionSetError as err:
        raise EvaluationError(str(err)) from None
    if len(data) == 0:
        raise EvaluationError("the dataset is empty")
    return DatasetImages(data, column, resolution), texts


# ---------------------------------------------------------------------------- FID reference
class FidReference(NamedTuple):
    """Captions to generate from, the real images they describe, and the set's name (part of the stats cache key)."""

    captions: List[str]
    images: LazyImages  # uint8 (N, 3, R, R) slices, read on demand
    name: str


def load_fid_reference(folder: Optional[Union[str, Path]], num: int, resolution: int) -> FidReference:
    """The FID reference set: the first ``num`` images of an imagefolder, or of the embedded test split (``folder=None``).

    ``folder`` holds the images and a ``metadata.jsonl`` with one ``{"file_name", "text" or "caption"}``
    per line. The real images are a :class:`~diffdis.eval.suite.LazyImages`: read only when (and where)
    a batch is needed, so a 30k-image reference set is never held in memory, and not read at all when
    its statistics are cached. Every image header is opened here, so a bad file fails on every process
    before any of them starts a collective.
    """
    if folder:
        folder = Path(folder)
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            raise EvaluationError(f"--fid-reference {folder} has no metadata.jsonl (lines of {{\"file_name\", \"text\"}})")
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()][:num]
        if any("file_name" not in r or not isinstance(r.get("text", r.get("caption")), str) for r in rows):
            raise EvaluationError(f"{meta}: every line needs 'file_name' and a 'text' (or 'caption') string")
        paths = [folder / r["file_name"] for r in rows]
        for path in paths:
            _open_reference_image(path).close()
        captions, name = [r.get("text", r.get("caption")) for r in rows], f"{folder.name}-r{resolution}"
        real = LazyImages(lambda i: _reference_image(paths[i], resolution), len(paths))
    else:
        from ..data.embedded import make_embedded_dataset

        ds = make_embedded_dataset("test", num, resolution=resolution)
        captions, name = list(ds["caption"]), f"embedded-test-r{resolution}"
        real = LazyImages(lambda i: ds[i]["image"], len(ds))
    if not captions:
        raise EvaluationError("the FID reference set is empty")
    return FidReference(captions, real, name)


def _open_reference_image(path: Path):
    """The PIL image at ``path`` (lazily decoded); an unreadable file is an :class:`EvaluationError`."""
    from PIL import Image

    try:
        return Image.open(path)
    except OSError as err:
        raise EvaluationError(f"cannot read reference image {path}: {err}") from None


def _reference_image(path: Path, resolution: int):
    """A reference image, RGB, resized and centre-cropped to ``resolution``."""
    from ..data.transforms import resize_and_crop

    with _open_reference_image(path) as image:
        try:
            return resize_and_crop(image.convert("RGB"), resolution)
        except OSError as err:
            raise EvaluationError(f"cannot read reference image {path}: {err}") from None

