"""Zero-shot tasks and generation prompts of the compositional dataset (:mod:`diffdis.data.compositional`).

Tasks (``load_zero_shot_tasks("compositional", task)``), each on its own test images:

=======================  ==========================================================  ===================
task                     images and classes                                          chance
=======================  ==========================================================  ===================
``heldout_colour_shape`` single objects of a HELD_OUT combination; 36 colour x shape  1/36 (acc1)
``seen_colour_shape``    single objects of the other 30 combinations (the control)   1/36 (acc1)
``relation``             two-object images of the 6 PROBE_PAIRS; 24 layout captions  1/24 (acc1);
                         (pair x {a left of b, b left of a, a above b, b above a})   0.5 (pair accuracy)
``size``                 every single-object image; small / large                    1/2
``position``             every single-object image; left/right/top/bottom/center     1/5
=======================  ==========================================================  ===================

Classes are balanced by construction (shuffled blocks of every combination), so chance is 1 / classes.

**Relation.** One class list serves every image, so the task fits :class:`~diffdis.eval.tasks.ZeroShotTask`:
classes ``2g`` and ``2g + 1`` are the two captions that differ only in object order ("red circle left of
a yellow triangle" / "yellow triangle left of a red circle"): the same bag of words. Plain ``acc1`` is
the argmax over all 24 captions; a bag-of-words model that recognises the objects and the axis
perfectly still only reaches 0.5 there. The headline number is :func:`relation_pair_accuracy`: the
image's own two candidates compared with each other (ties count a half), at which any bag-of-words
model scores exactly 0.5 and random guessing 0.5 in expectation.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Tuple

import datasets
import torch

from diffdis.data.compositional import (
    HELD_OUT,
    PROBE_PAIRS,
    Item,
    inverse_relation,
    make_compositional_dataset,
)
from diffdis.data.embedded import COLOURS, POSITIONS, SHAPES, SIZES

from . import zeroshot as zs
from .tasks import EvaluationError, ZeroShotTask

COMPOSITIONAL_TASKS: Tuple[str, ...] = ("heldout_colour_shape", "seen_colour_shape", "relation", "size", "position")
RELATION_TEMPLATES: Tuple[str, ...] = ("a {}", "a picture of a {}")
# Caption of a layout class; "left of" and "above" only: "b right of a" is the same picture as "a left of b".
_CANONICAL = ("left of", "above")


def relation_classnames() -> List[str]:
    """The 24 layout classes of the relation task, in label order: per probe pair (x, y),
    "x left of a y", "y left of a x", "x above a y", "y above a x" (each completed by "a {}")."""
    names = []
    for x, y in PROBE_PAIRS:
        for relation in _CANONICAL:
            names += [f"{x.describe()} {relation} a {y.describe()}", f"{y.describe()} {relation} a {x.describe()}"]
    return names


def relation_label(a: Item, relation: str, b: Item) -> int:
    """Class id (in :func:`relation_classnames`) of the picture "a ``relation`` b" of two probe-pair objects."""
    if relation not in _CANONICAL:
        a, relation, b = b, inverse_relation(relation), a
    for k, pair in enumerate(PROBE_PAIRS):
        if {a, b} == set(pair):
            return 4 * k + 2 * _CANONICAL.index(relation) + (0 if a == pair[0] else 1)
    raise EvaluationError(f"{a.describe()} and {b.describe()} are not one of the probe pairs of the relation task")


def relation_pair_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy between each image's two same-words candidates (classes ``2g``, ``2g + 1`` with g = label // 2).

    A tie counts a half, so a model blind to word order scores exactly 0.5.

    Args:
        logits: (N, C) scores of the :func:`relation_classnames` classes (C even).
        labels: (N,) true class ids.
    """
    if logits.ndim != 2 or logits.shape[1] % 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise EvaluationError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    labels = labels.to(logits.device).long()
    pairs = logits.float().view(logits.shape[0], -1, 2)[torch.arange(len(labels)), labels // 2]  # (N, 2)
    true = pairs.gather(1, (labels % 2)[:, None])[:, 0]
    other = pairs.gather(1, (1 - labels % 2)[:, None])[:, 0]
    return ((true > other).float() + 0.5 * (true == other).float()).mean().item()


def task_metrics(task: str, logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Metrics of a task beyond the standard ones, from its (N, C) logits: ``{"pair_acc"}`` for ``relation``, else {}."""
    return {"pair_acc": relation_pair_accuracy(logits, labels)} if task == "relation" else {}


def task_chance(task: str) -> Dict[str, float]:
    """Chance level of each metric of a task: ``{"acc1": ...}``, plus ``"pair_acc"`` for ``relation``."""
    sizes = {"heldout_colour_shape": len(COLOURS) * len(SHAPES), "seen_colour_shape": len(COLOURS) * len(SHAPES),
             "relation": len(relation_classnames()), "size": len(SIZES), "position": len(POSITIONS)}
    if task not in sizes:
        raise EvaluationError(f"unknown compositional task {task!r}; choose one of {', '.join(COMPOSITIONAL_TASKS)}")
    chance = {"acc1": 1.0 / sizes[task]}
    return {**chance, "pair_acc": 0.5} if task == "relation" else chance


def _task_images(task: str, split: str, num_samples: Optional[int], resolution: int, seed: int) -> datasets.Dataset:
    """The images of a task: the first ``num_samples`` of its kind (all of the split's by default)."""
    if task == "relation":
        return make_compositional_dataset(split, num_samples, resolution, seed, kind="pair")
    if task in ("size", "position"):
        return make_compositional_dataset(split, num_samples, resolution, seed, kind="single")
    if split == "train" and task == "heldout_colour_shape":
        raise EvaluationError("the train split has no held-out combinations; use split validation or test")
    # Outside train, single-object images alternate held-out / seen: 2n of them hold n of each.
    singles = make_compositional_dataset(split, None if num_samples is None else 2 * num_samples, resolution, seed,
                                         kind="single")
    wanted = task == "heldout_colour_shape"
    return singles.select([i for i, held in enumerate(singles["heldout"]) if held == wanted])


def _labels(data: datasets.Dataset, task: str) -> torch.Tensor:
    if task == "relation":
        rows = zip(data["colour"], data["shape"], data["relation"], data["colour_b"], data["shape_b"])
        return torch.tensor([relation_label(Item(ca, sa), r, Item(cb, sb)) for ca, sa, r, cb, sb in rows])
    if task in ("size", "position"):
        return torch.tensor(data[f"{task}_id"])
    return torch.tensor(data["colour_id"]) * len(SHAPES) + torch.tensor(data["shape_id"])


def _text_side(task: str) -> Tuple[List[str], List[str]]:
    if task == "relation":
        return relation_classnames(), list(RELATION_TEMPLATES)
    if task in ("size", "position"):
        return zs.load_task(task)
    return zs.load_task("colour_shape")


def load_compositional_tasks(
    task: str, split: str = "test", num_samples: Optional[int] = None, resolution: int = 16, seed: int = 0
) -> Tuple[datasets.Dataset, Dict[str, ZeroShotTask]]:
    """The images and the :class:`~diffdis.eval.tasks.ZeroShotTask` of one compositional task.

    Args:
        task: one of :data:`COMPOSITIONAL_TASKS` (each has its own images, so there is no "all").
        split: "validation" or "test" ("train" has no held-out combinations and other pairs).
        num_samples: keep the first N images of the task (default: all of the split's).
        resolution: image side in pixels.
        seed: dataset seed.

    Returns:
        ``(dataset with an "image" column, {task: ZeroShotTask(labels, classnames, templates)})``.
    """
    if task not in COMPOSITIONAL_TASKS:
        raise EvaluationError(f"unknown compositional task {task!r}; choose one of {', '.join(COMPOSITIONAL_TASKS)}"
                              " (each has its own images, so there is no 'all')")
    if num_samples is not None and num_samples < 1:
        raise EvaluationError(f"num_samples must be at least 1, got {num_samples}")
    try:
        data = _task_images(task, split, num_samples, resolution, seed)
    except ValueError as err:  # an unknown split
        raise EvaluationError(str(err)) from None
    if len(data) == 0:
        raise EvaluationError("the dataset is empty")
    labels = _labels(data, task)
    classnames, templates = _text_side(task)
    return data, {task: ZeroShotTask(labels, classnames, templates)}


# ---------------------------------------------------------------------------- generation prompts
def relation_prompts(num_per_class: int = 1, seed: Optional[int] = 0) -> List[dict]:
    """Prompts of every relation-task layout, with the attributes :func:`diffdis.eval.objects.adherence` checks.

    Returns:
        ``[{"prompt", "colour", "shape", "relation", "colour_b", "shape_b", "label"}, ...]``: 24 layouts
        x ``num_per_class``, shuffled with ``random.Random(seed)`` (``None``: in label order).
    """
    prompts = []
    for x, y in PROBE_PAIRS:
        for relation in _CANONICAL:
            for a, b in ((x, y), (y, x)):
                prompt = RELATION_TEMPLATES[0].format(f"{a.describe()} {relation} a {b.describe()}")
                entry = {"prompt": prompt, "colour": a.colour, "shape": a.shape, "relation": relation,
                         "colour_b": b.colour, "shape_b": b.shape, "label": relation_label(a, relation, b)}
                prompts += [dict(entry) for _ in range(num_per_class)]
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts


def heldout_prompts(num_per_combo: int = 1, seed: Optional[int] = 0) -> List[dict]:
    """Prompts "a <colour> <shape>" of the held-out combinations: ``[{"prompt", "colour", "shape"}, ...]``."""
    prompts = [{"prompt": f"a {h.describe()}", "colour": h.colour, "shape": h.shape}
               for h in HELD_OUT for _ in range(num_per_combo)]
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts

