"""Prompt adherence of generated images, scored by the reference attribute classifier."""

from __future__ import annotations

import random
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from diffdis.data import embedded
from diffdis.eval.reference import AttributeClassifier, pixel_colour, to_unit_float

IdsLike = Union[torch.Tensor, Sequence[int]]


def adherence_prompts(
    num_per_combo: int = 1, seed: Optional[int] = 0, template: str = "a {colour} {shape}"
) -> list[dict]:
    """Prompts over every shape x colour combination, with their target ids.

    Args:
        num_per_combo: how many times each combination is listed (images per combination).
        seed: order of the list is shuffled with ``random.Random(seed)`` so that a truncated
            list stays balanced; ``None`` keeps the grouped order (shape-major).
        template: prompt phrasing with ``{colour}`` and ``{shape}`` fields.

    Returns:
        ``[{"prompt", "shape", "colour", "shape_id", "colour_id"}, ...]`` of length
        ``len(SHAPES) * len(COLOURS) * num_per_combo``.
    """
    prompts = [
        {
            "prompt": template.format(colour=colour, shape=shape),
            "shape": shape,
            "colour": colour,
            "shape_id": shape_id,
            "colour_id": colour_id,
        }
        for shape_id, shape in enumerate(embedded.SHAPES)
        for colour_id, colour in enumerate(embedded.COLOURS)
        for _ in range(num_per_combo)
    ]
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts


def prompt_adherence(
    images: torch.Tensor,
    shape_ids: IdsLike,
    colour_ids: IdsLike,
    classifier: AttributeClassifier,
    size_ids: Optional[IdsLike] = None,
    position_ids: Optional[IdsLike] = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Fraction of images whose attributes, as the reference classifier sees them, match the prompt.

    Args:
        images: generated images (N, 3, H, W), uint8 or float in [0, 1]; resized (bilinear,
            antialiased) to the classifier's resolution if needed.
        shape_ids, colour_ids: prompted ids (N,).
        classifier: reference ``AttributeClassifier``.
        size_ids, position_ids: optional prompted ids (N,); add ``adherence/size`` / ``adherence/position``.
        batch_size: images per classifier forward.

    Returns:
        ``adherence/shape``, ``adherence/colour``, ``adherence/both`` (shape and colour right),
        ``adherence/colour_pixel`` (colour from ``pixel_colour``), ``adherence/colour_agreement``
        (classifier and pixel measure agree), optional ``adherence/size`` and ``adherence/position``,
        and ``adherence/num_images``.
    """
    counts = adherence_counts(images, shape_ids, colour_ids, classifier, size_ids, position_ids, batch_size)
    return adherence_from_counts(counts)


def adherence_counts(
    images: torch.Tensor,
    shape_ids: IdsLike,
    colour_ids: IdsLike,
    classifier: AttributeClassifier,
    size_ids: Optional[IdsLike] = None,
    position_ids: Optional[IdsLike] = None,
    batch_size: int = 512,
) -> dict[str, int]:
    """How many images match their prompt, per criterion (arguments as :func:`prompt_adherence`).

    Counts add up over batches and processes, so adherence can be scored batch by batch and the
    per-process counts summed; :func:`adherence_from_counts` turns the totals into fractions.

    Returns:
        ``{"shape", "colour", ["size"], ["position"], "both", "colour_pixel", "colour_agreement", "num_images"}``.
    """
    if tuple(images.shape[-2:]) != (classifier.resolution, classifier.resolution):
        # Position and size are calibrated at the classifier's resolution.
        size = (classifier.resolution, classifier.resolution)
        images = F.interpolate(to_unit_float(images), size=size, mode="bilinear", antialias=True).clamp(0, 1)
    preds = classifier.predict(images, batch_size=batch_size)
    targets = {"shape": _as_ids(shape_ids), "colour": _as_ids(colour_ids)}
    if size_ids is not None:
        targets["size"] = _as_ids(size_ids)
    if position_ids is not None:
        targets["position"] = _as_ids(position_ids)
    hits = {name: preds[name] == target for name, target in targets.items()}
    colour_px = pixel_colour(images).cpu()
    counts = {name: int(hit.sum()) for name, hit in hits.items()}
    counts["both"] = int((hits["shape"] & hits["colour"]).sum())
    counts["colour_pixel"] = int((colour_px == targets["colour"]).sum())
    counts["colour_agreement"] = int((colour_px == preds["colour"]).sum())
    counts["num_images"] = int(images.shape[0])
    return counts


def adherence_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """``adherence/<criterion>`` fractions (and ``adherence/num_images``) from :func:`adherence_counts` totals."""
    num = counts["num_images"]
    metrics = {f"adherence/{name}": (value / num if num else float("nan")) for name, value in counts.items()}
    metrics["adherence/num_images"] = float(num)
    return metrics


def _as_ids(ids: IdsLike) -> torch.Tensor:
    """Class ids as a CPU LongTensor (N,)."""
    return torch.as_tensor(ids, dtype=torch.long).cpu().flatten()
