"""Benchmark suites: classification and retrieval tasks from a YAML file, run on one model, as CLIP_benchmark results.

A suite file lists the tasks (relative paths are read from the suite file's folder)::

    classification:
      - task: cifar10                 # a built-in task: class names, templates (and hub dataset)
        dataset: data/cifar10         # imagefolder, webdataset shards, saved dataset or hub id
      - name: my_pets                 # the record's dataset name (default: the task, or the folder's name)
        task: auto
        dataset: data/pets
        classnames: data/pets/names.txt
    retrieval:
      - name: mscoco_captions
        dataset: data/coco/dataset_coco.json   # Karpathy-split JSON, or a dataset with a caption column
        images: data/coco                      # the folder of the JSON's filepath/filename
        split: test

Every task runs through the evaluation API (:func:`~diffdis.eval.api.zero_shot`,
:func:`~diffdis.eval.api.retrieval`), sharded like them, and gives one record in CLIP_benchmark's layout
(``dataset``, ``model``, ``pretrained``, ``task``, ``metrics``, ``language``) with its metric names
(``acc1``, ``acc5``, ``mean_per_class_recall``; ``image_retrieval_recall@k``, ``text_retrieval_recall@k``),
so the numbers sit beside published ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..utils.host import host_record
from .api import (
    EvaluationError,
    ZeroShotSettings,
    load_retrieval_set,
    load_zero_shot_tasks,
    resolved_settings,
    retrieval,
    zero_shot,
)

PathLike = Union[str, Path]
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10))


@dataclass
class ClassificationEntry:
    """One zero-shot classification task of a suite (the arguments of :func:`~diffdis.eval.api.load_zero_shot_tasks`)."""

    task: str = "auto"  # a built-in task (class names, templates, default dataset) or "auto" (the ClassLabel's names)
    dataset: Optional[str] = None  # local folder or hub id; None: the built-in task's hub dataset
    name: Optional[str] = None  # the record's dataset name; None: the task, or the dataset folder's name
    split: Optional[str] = None
    num_samples: Optional[int] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    classnames: Optional[str] = None  # class-name file (checked against a ClassLabel name by name)
    templates: Optional[str] = None  # template file


@dataclass
class RetrievalEntry:
    """One retrieval task of a suite (the arguments of :func:`~diffdis.eval.api.load_retrieval_set`)."""

    dataset: str  # Karpathy-split JSON, or a dataset with a caption column
    name: Optional[str] = None  # the record's dataset name; None: the file's or folder's name
    split: str = "test"
    images: Optional[str] = None  # image folder of a Karpathy-split JSON
    num_samples: Optional[int] = None
    caption_column: Optional[str] = None
    image_column: Optional[str] = None


@dataclass
class Suite:
    """The tasks of a suite file, paths resolved."""

    classification: List[ClassificationEntry]
    retrieval: List[RetrievalEntry]
    path: str


PATH_FIELDS = ("dataset", "images", "classnames", "templates")


def _entry(cls, raw: Any, where: str, folder: Path):
    if not isinstance(raw, Mapping):
        raise EvaluationError(f"{where}: expected a mapping of options, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EvaluationError(f"{where}: unknown option '{unknown[0]}'; expected: {', '.join(sorted(known))}")
    values = {k: (str(v) if v is not None and k != "num_samples" else v) for k, v in raw.items()}
    samples = values.get("num_samples")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 0):
        raise EvaluationError(f"{where}: num_samples must be a whole number >= 0, got {samples!r}")
    for key in PATH_FIELDS:
        value = values.get(key)
        if value and not Path(value).is_absolute() and (folder / value).exists():
            values[key] = str(folder / value)  # relative to the suite file; anything else is a hub id or as given
    try:
        return cls(**values)
    except TypeError:
        raise EvaluationError(f"{where}: 'dataset' is required") from None


def load_suite(path: PathLike) -> Suite:
    """Read a suite file (YAML with ``classification`` and ``retrieval`` lists; see the module docstring).

    Raises:
        EvaluationError: a missing or unreadable file, bad YAML, an unknown key, an entry without a dataset.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise EvaluationError(f"cannot read suite {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise EvaluationError(f"suite {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, Mapping) or set(data) - {"classification", "retrieval"}:
        raise EvaluationError(f"suite {path}: expected a mapping with 'classification' and/or 'retrieval' lists")
    lists = {key: data.get(key) or [] for key in ("classification", "retrieval")}
    if any(not isinstance(v, list) for v in lists.values()) or not any(lists.values()):
        raise EvaluationError(f"suite {path}: 'classification' and 'retrieval' must be lists, and not both empty")
    folder = path.parent
    return Suite(
        [_entry(ClassificationEntry, e, f"suite {path}: classification entry {i + 1}", folder)
         for i, e in enumerate(lists["classification"])],
        [_entry(RetrievalEntry, e, f"suite {path}: retrieval entry {i + 1}", folder)
         for i, e in enumerate(lists["retrieval"])],
        str(path),
    )


def _record(dataset: str, model: str, task: str, metrics: Mapping[str, Any], names: Sequence[str],
            **extra) -> Dict[str, Any]:
    """One result in CLIP_benchmark's layout (``pretrained``: the model folder's name, as CLIP_benchmark's
    ``build`` joins ``model`` and ``pretrained``), with the extra fields after it."""
    return {"dataset": dataset, "model": model, "pretrained": Path(model).name, "task": task,
            "metrics": {k: float(metrics[k]) for k in names if k in metrics}, "language": "en", **extra}


def run_suite(
    model,
    suite: Suite,
    settings: Optional[ZeroShotSettings] = None,
    accelerator=None,
    progress: bool = False,
    model_name: str = "",
) -> List[Dict[str, Any]]:
    """Every task of ``suite`` on ``model``, in the suite's order: one CLIP_benchmark record per task.

    Args:
        model: a zero-shot pipeline (:func:`~diffdis.pipelines.zeroshot_pipeline.load_zero_shot_pipeline`).
        suite: from :func:`load_suite`.
        settings: the zero-shot settings of every task.
        accelerator, progress: shard every task over processes; show progress bars.
        model_name: the records' ``model`` (the model folder).

    Returns:
        Records with ``dataset``, ``model``, ``pretrained``, ``task`` (``zeroshot_classification`` or
        ``zeroshot_retrieval``), ``metrics``, ``language``, then ``num_samples``, ``split`` and ``source``
        (the dataset as given).
    """
    settings = resolved_settings(settings or ZeroShotSettings(), model)
    records = []
    for entry in suite.classification:
        images, tasks = load_zero_shot_tasks(entry.dataset, entry.task, entry.split, entry.num_samples, model.resolution,
                                             entry.image_column, entry.label_column, entry.classnames, entry.templates)
        results = zero_shot(model, tasks, images, settings, accelerator, progress)
        for name, result in results.items():  # one task, or e.g. the embedded "all": shape, colour, colour_shape
            label = (entry.name if len(results) == 1 else f"{entry.name}/{name}") if entry.name else name
            records.append(_record(label, model_name, "zeroshot_classification", result["metrics"],
                                   CLASSIFICATION_METRICS, num_samples=len(images), split=entry.split,
                                   source=entry.dataset, num_classes=result["num_classes"]))
    for entry in suite.retrieval:
        images, captions = load_retrieval_set(entry.split, entry.num_samples, model.resolution, entry.dataset,
                                              entry.images, entry.caption_column, entry.image_column)
        name = entry.name or Path(entry.dataset).stem.removeprefix("dataset_")
        result = retrieval(model, images, captions, settings, accelerator, progress, name=name)[name]
        records.append(_record(name, model_name, "zeroshot_retrieval", result["metrics"], RETRIEVAL_METRICS,
                               num_samples=result["num_images"], num_texts=result["num_texts"], split=entry.split,
                               source=entry.dataset))
    return records


def suite_table(records: Sequence[Mapping[str, Any]]) -> List[str]:
    """The records as one markdown table: a row per task, a column per CLIP_benchmark metric (empty where it does
    not apply)."""
    columns = [c for c in CLASSIFICATION_METRICS + RETRIEVAL_METRICS if any(c in r["metrics"] for r in records)]
    lines = ["| dataset | task | n | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for r in records:
        cells = [f"{r['metrics'][c]:.4f}" if c in r["metrics"] else "" for c in columns]
        lines.append(f"| {r['dataset']} | {r['task']} | {r.get('num_samples', '')} | " + " | ".join(cells) + " |")
    return lines


def write_suite_results(out: PathLike, records: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any]) -> Path:
    """``benchmark.md`` (the table), ``benchmark.json`` (provenance and every record) and ``records/<dataset>_<task>.json``
    (one CLIP_benchmark result file per task, as its ``build`` command reads them).

    Returns:
        The path of ``benchmark.json``.
    """
    out = Path(out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    for r in records:
        name = f"{r['dataset'].replace('/', '_')}_{r['task']}.json"
        (out / "records" / name).write_text(json.dumps(r, indent=1) + "\n")
    path = out / "benchmark.json"
    path.write_text(json.dumps({**provenance, "records": list(records)}, indent=1, default=str) + "\n")
    command = provenance.get("command")
    lines = [f"# Benchmark: `{provenance.get('model', '')}`", ""] + suite_table(records)
    lines += ["", f"Command: `{command}`" if command else "", f"Settings: {json.dumps(provenance.get('settings', {}))}"]
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
    return path


def suite_provenance(model_dir: PathLike, suite: Suite, settings: ZeroShotSettings, command: str = "",
                     num_processes: int = 1, device=None) -> Dict[str, Any]:
    """What produced a suite's results: model, suite file, zero-shot settings as run, command, commit, processes
    and the machine (:func:`~diffdis.utils.host.host_record` of ``device``)."""
    from ..experiments.compare import git_commit

    return {"model": str(model_dir), "suite": suite.path, "settings": asdict(settings), "command": command,
            "commit": git_commit(), "num_processes": num_processes,
            "machine": host_record(device)}
