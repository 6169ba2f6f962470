"""Zero-shot classification and retrieval: task files, classifier builder, metrics, sharded feature loop.

The classifier builder is pure (class names × templates -> weight matrix, open_clip style, from any text
feature function) and kept
apart from the loop that extracts image features (sharded over processes, gathered before any
metric) and from the metric functions, which return flat dicts with CLIP_benchmark's names
(``acc1``, ``acc5``, ``mean_per_class_recall``, ``image_retrieval_recall@k``,
``text_retrieval_recall@k``). The diffusion-classifier baseline (Li et al. 2023, in
:mod:`diffdis.pipelines.zeroshot`) returns logits, so it goes through the same metrics.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .suite import shard_range

FeatureFn = Callable[[torch.Tensor, List[torch.Generator]], torch.Tensor]
EMBEDDED_TASKS = ("shape", "colour", "colour_shape")


class TemplateError(ValueError):
    """An unknown task or a malformed class-name / template file."""


# ---------------------------------------------------------------------------- templates and class names
def task_names() -> List[str]:
    """Names accepted by :func:`load_task` (the JSON files shipped in ``diffdis/eval/templates``)."""
    folder = resources.files("diffdis.eval") / "templates"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _check_templates(templates: Sequence[str], source: str) -> List[str]:
    templates = [t.replace("{c}", "{}") for t in templates]  # CLIP_benchmark writes {c}
    if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise TemplateError(f"{source}: templates must be a non-empty list of strings with exactly one '{{}}'")
    return templates


def _task_file(name: str) -> dict:
    if name not in task_names():
        raise TemplateError(f"unknown zero-shot task {name!r}; choose one of {', '.join(task_names())}")
    return json.loads((resources.files("diffdis.eval") / "templates" / f"{name}.json").read_text(encoding="utf-8"))


def load_task(name: str) -> Tuple[List[str], List[str]]:
    """Built-in class names and template ensemble of a task, e.g. ``"cifar10"``, ``"imagenet1k"``, ``"shape"``."""
    data = _task_file(name)
    return list(data["classnames"]), _check_templates(data["templates"], name)


class BenchmarkDataset(NamedTuple):
    """Where a benchmark task's images live: a hub dataset id, its split and label column.

    The hub ids are CLIP_benchmark's own copies (``clip-benchmark/wds_*``: webdataset shards whose integer
    ``cls`` follows the class order of the task's names); the image column is the shard's image file type.
    """

    hub: str
    split: str
    label_column: str


def benchmark_names() -> List[str]:
    """The built-in tasks that name a dataset (:func:`benchmark_dataset`): CLIP_benchmark's classification sets.

    ============== ======= ============== ======= ============== =======
    task           classes task           classes task           classes
    ============== ======= ============== ======= ============== =======
    imagenet1k     1000    flowers        102     sun397         397
    cifar10        10      caltech101     102     gtsrb          43
    cifar100       100     cars           196     resisc45       45
    stl10          10      fgvc_aircraft  100     mnist          10
    food101        101     dtd            47      country211     211
    pets           37      eurosat        10
    ============== ======= ============== ======= ============== =======
    """
    return [name for name in task_names() if "dataset" in _task_file(name)]


def benchmark_dataset(name: str) -> Optional[BenchmarkDataset]:
    """The dataset of a built-in task (None for a task without one, e.g. the embedded ``shape``)."""
    spec = _task_file(name).get("dataset")
    if spec is None:
        return None
    return BenchmarkDataset(spec["hub"], spec.get("split", "test"), spec.get("label_column", "label"))


ENSEMBLES = ("mean", "max")


def task_ensemble(name: str) -> str:
    """How a built-in task pools its templates: ``"mean"`` (CLIP's averaged embedding) or ``"max"``.

    ``"max"`` scores a class by its best-matching template. The embedded shape and colour tasks use it:
    their templates name the *other* attribute ("a red {}", "a green {}", ...), and an image matches one
    of them, not their average.
    """
    if name not in task_names():
        return "mean"
    ensemble = _task_file(name).get("ensemble", "mean")
    if ensemble not in ENSEMBLES:
        raise TemplateError(f"{name}: ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    return ensemble


def load_classnames_file(path: Union[str, Path]) -> List[str]:
    """Class names from a JSON list, a JSON object with ``classnames``, or a text file (one per line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else None
        names = data["classnames"] if isinstance(data, dict) else data
    except (OSError, ValueError, KeyError) as err:
        raise TemplateError(f"cannot read class names from {path}: {err}") from None
    if data is None:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(isinstance(n, str) for n in names):
        raise TemplateError(f"{path}: no class names found")
    return list(names)


def load_templates_file(path: Union[str, Path]) -> List[str]:
    """Templates (each with one ``{}``) from a JSON list, a JSON object with ``templates``, or a text file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else None
        templates = data["templates"] if isinstance(data, dict) else data
    except (OSError, ValueError, KeyError) as err:
        raise TemplateError(f"cannot read templates from {path}: {err}") from None
    if data is None:
        templates = [line.strip() for line in text.splitlines() if line.strip()]
    return _check_templates(templates, str(path))


def embedded_labels(dataset, task: str) -> torch.Tensor:
    """Labels (N,) of an embedded-dataset split for ``task`` in the class order of :func:`load_task`."""
    if task == "shape":
        return torch.tensor(dataset["shape_id"])
    if task == "colour":
        return torch.tensor(dataset["colour_id"])
    if task == "colour_shape":
        num_shapes = len(load_task("shape")[0])
        return torch.tensor(dataset["colour_id"]) * num_shapes + torch.tensor(dataset["shape_id"])
    raise ValueError(f"unknown embedded task {task!r}; choose one of {EMBEDDED_TASKS}")


# ---------------------------------------------------------------------------- classifier builder
TextEncodeFn = Callable[[List[str]], torch.Tensor]


@torch.no_grad()
def build_zero_shot_classifier(
    encode: TextEncodeFn,
    classnames: Sequence[str],
    templates: Sequence[str],
    ensemble: str = "mean",
) -> torch.Tensor:
    """Class weights from class names x templates.

    Args:
        encode: texts -> normalised text features (N, d), e.g. a zero-shot pipeline's ``encode_text``.

    ``ensemble="mean"``: (d, C), the normalised template features averaged per class and renormalised
    (open_clip / CLIP_benchmark). ``ensemble="max"``: (d, C, T), every normalised template feature kept;
    :func:`class_logits` then scores a class by its best template.
    """
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    texts = [template.format(name) for name in classnames for template in templates]
    queries = encode(texts).float()  # (C*T, d)
    queries = queries.view(len(classnames), len(templates), -1)  # (C, T, d)
    if ensemble == "max":
        return F.normalize(queries, dim=-1).permute(2, 0, 1).contiguous()  # (d, C, T)
    return F.normalize(queries.mean(dim=1), dim=-1).T.contiguous()  # (d, C)


def class_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine logits (N, C) of normalised features (N, d) against (d, C) weights, or (d, C, T) max-pooled."""
    classifier = classifier.float().to(image_features.device)
    if classifier.ndim == 3:
        return torch.einsum("nd,dct->nct", image_features.float(), classifier).amax(dim=-1)  # (N, C)
    return image_features.float() @ classifier  # (N, C)


# ---------------------------------------------------------------------------- metrics
def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def evaluate_zero_shot(image_features: torch.Tensor, labels: torch.Tensor, classifier: Optional[torch.Tensor] = None) -> Dict:
    """Top-1/top-5 accuracy, mean per-class recall and the confusion matrix.

    Args:
        image_features: (N, d) normalised features, or (N, C) logits when ``classifier`` is None
            (e.g. from :func:`diffusion_classifier_logits`).
        labels: (N,) class indices.
        classifier: (d, C) or (d, C, T) from :func:`build_zero_shot_classifier`.

    Returns:
        ``acc1``, ``acc5`` (only with at least 5 classes), ``mean_per_class_recall`` (over the
        classes present in ``labels``), ``num_samples`` and ``confusion_matrix`` (C, C) long tensor.
    """
    logits = image_features.float()  # (N, C) or (N, d)
    if classifier is not None:
        logits = class_logits(logits, classifier)  # (N, C)
    labels = labels.to(logits.device).long()
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    num_classes = logits.shape[1]
    preds = logits.argmax(dim=1)
    metrics: Dict = {"acc1": (preds == labels).float().mean().item()}
    if num_classes >= 5:
        top5 = logits.topk(5, dim=1).indices  # (N, 5)
        metrics["acc5"] = (top5 == labels[:, None]).any(dim=1).float().mean().item()
    cm = confusion_matrix(preds.cpu(), labels.cpu(), num_classes)
    support = cm.sum(dim=1)
    present = support > 0
    metrics["mean_per_class_recall"] = (cm.diag()[present].float() / support[present]).mean().item()
    metrics["num_samples"] = int(labels.shape[0])
    metrics["confusion_matrix"] = cm
    return metrics


def save_confusion_matrix_png(cm: torch.Tensor, classnames: Sequence[str], path: Union[str, Path]) -> None:
    """Row-normalised confusion matrix as a PNG (class names on the axes up to 40 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.as_tensor(cm).float()
    rates = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)  # (C, C)
    n = len(classnames)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046)
    if n <= 40:
        ax.set_xticks(range(n), labels=list(classnames), rotation=90)
        ax.set_yticks(range(n), labels=list(classnames))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _top_hits(queries: torch.Tensor, keys: torch.Tensor, is_positive: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              k: int, chunk_size: int) -> torch.Tensor:
    """(Q, k) bool: whether each query's j-th best key is one of its positives, ``chunk_size`` queries at a time."""
    hits = []
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start : start + chunk_size] @ keys.T  # (b, M)
        top = scores.topk(min(k, keys.shape[0]), dim=1).indices  # (b, k)
        hits.append(is_positive(torch.arange(start, start + scores.shape[0]), top))
    return torch.cat(hits)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image_index: torch.Tensor,
    recall_k: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> Dict[str, float]:
    """Recall@k both ways, named and counted as CLIP_benchmark does.

    Args:
        image_features: (N_img, d) normalised. text_features: (N_txt, d) normalised.
        text_to_image_index: (N_txt,) the image each caption belongs to (an image may have several captions).
        recall_k: the k's.
        chunk_size: queries scored at once (memory: chunk_size x N_txt scores, never the whole matrix).

    Returns:
        ``image_retrieval_recall@k`` (text query -> images: a hit when the caption's image is in the top k) and
        ``text_retrieval_recall@k`` (image query -> texts: a hit when any of the image's captions is in the top k),
        each the share of queries with a hit.
    """
    images, texts, index = image_features.float(), text_features.float(), text_to_image_index.long().cpu()
    k_max = max(recall_k)
    text_hits = _top_hits(texts, images, lambda q, top: top.cpu() == index[q, None], k_max, chunk_size)  # (N_txt, k)
    image_hits = _top_hits(images, texts, lambda q, top: index[top.cpu()] == q[:, None], k_max, chunk_size)  # (N_img, k)
    metrics = {}
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = text_hits[:, :k].any(dim=1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = image_hits[:, :k].any(dim=1).float().mean().item()
    return metrics


# ---------------------------------------------------------------------------- evaluation loop
def image_generators(indices: Sequence[int], seed: int) -> List[torch.Generator]:
    """One CPU generator per image, seeded by its global index: features do not depend on batching or sharding."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def compute_image_features(
    feature_fn: FeatureFn,
    load_batch: Callable[[List[int]], torch.Tensor],
    num_items: int,
    batch_size: int = 32,
    seed: int = 0,
    accelerator=None,
    progress: bool = False,
) -> torch.Tensor:
    """Features (num_items, d) of every item, computed on this process's shard and gathered.

    Args:
        feature_fn: ``(pixel_values (b, 3, H, W), generators) -> (b, d)``.
        load_batch: item indices -> pixel values (b, 3, H, W).
        accelerator: an ``accelerate.Accelerator``; each process takes a contiguous shard and the
            features of all processes are gathered (in item order) on every process.
    """
    from tqdm.auto import tqdm

    if num_items == 0:
        raise ValueError("the dataset is empty")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = list(shard_range(num_items, rank, world))
    feats = []
    for start in tqdm(range(0, len(mine), batch_size), disable=not progress or rank != 0, desc="images"):
        idx = mine[start : start + batch_size]
        feats.append(feature_fn(load_batch(idx), image_generators(idx, seed)).float().cpu())  # (b, d)
    local = torch.cat(feats) if feats else None
    if world == 1:
        return local
    from accelerate.utils import gather_object

    parts = gather_object([local])  # one entry per process, in rank order
    return torch.cat([p for p in parts if p is not None])
