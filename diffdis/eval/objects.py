"""Exact, non-learned prompt-adherence scorers for images of coloured shapes on a dark background.

Generated images are scored from their pixels, without a trained classifier:

* :func:`find_objects` estimates the background, keeps the pixels clearly brighter than it, gives each
  the nominal colour (:data:`~diffdis.data.embedded.COLOUR_RGB`) nearest in direction (brightness and
  coverage only scale a pixel's colour above the background), and returns one object per colour that
  covers enough pixels, with its soft coverage map, area and centroid.
* :func:`match_shape` compares an object's coverage map with the renderer's own masks of every shape,
  scaled to the object's area and centred on its centroid, and returns the closest shape.
* :func:`score_single` (one object: colour, shape, no second object) and :func:`score_pair` (two
  objects: both colours present and nothing else, relation from the centroids, both shapes) combine
  them; :func:`adherence` averages them over a batch.

The scorers assume one object per colour (the compositional pairs always differ in colour).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from diffdis.data import embedded
from diffdis.data.compositional import RELATIONS, Item, item
from diffdis.data.embedded import COLOUR_RGB, COLOURS, SHAPES, SUPERSAMPLE


class ScorerError(ValueError):
    """A bad input of a pixel scorer (image layout, attribute name)."""


class DetectedObject(NamedTuple):
    """A coloured object found in an image."""

    colour_id: int
    area: float  # sum of the coverage map, in pixels
    centre: tuple[float, float]  # coverage-weighted centroid (x, y), in pixels from the top-left corner
    coverage: np.ndarray  # (H, W) in [0, 1]


def as_hwc_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image as (H, W, 3) uint8: accepts (H, W, 3) or (3, H, W), uint8 or float in [0, 1]."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ScorerError(f"expected an (H, W, 3) or (3, H, W) image, got shape {array.shape}")
    if array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return array


def find_objects(
    image: np.ndarray | torch.Tensor, threshold: float = 40.0, min_fraction: float = 0.25
) -> list[DetectedObject]:
    """The coloured objects of an image, largest first.

    Args:
        image: (H, W, 3) or (3, H, W), uint8 or float in [0, 1].
        threshold: a pixel is foreground when a channel exceeds the background by this much (0..255), or by
            a quarter of the brightest excess if that is larger.
        min_fraction: a colour is an object when its foreground pixels number at least this fraction of
            the most frequent colour's (and at least 2): blended edges of other colours are not objects.
    """
    pixels = as_hwc_uint8(image).astype(np.float64)  # (H, W, 3)
    value = pixels.max(axis=-1)  # (H, W)
    background = np.median(pixels[value <= np.median(value)], axis=0)  # (3,) the darker half is background
    excess = pixels - background  # (H, W, 3) = coverage x (colour - background) + noise
    strength = excess.max(axis=-1)
    foreground = strength > max(threshold, 0.25 * float(strength.max()))
    directions = np.asarray(COLOUR_RGB, dtype=np.float64) - background  # (C, 3)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    projection = excess @ directions.T  # (H, W, C)
    cosine = projection / np.maximum(np.linalg.norm(excess, axis=-1, keepdims=True), 1e-6)
    nearest = cosine.argmax(axis=-1)  # (H, W)
    counts = np.bincount(nearest[foreground], minlength=len(COLOURS))
    objects = []
    for colour_id in np.flatnonzero(counts >= max(2.0, min_fraction * counts.max())):
        mask = foreground & (nearest == colour_id)
        near = _dilate(mask) & (cosine[..., colour_id] > 0.8)  # blended edge pixels of this colour
        full = np.percentile(projection[..., colour_id][mask], 90)
        coverage = np.where(near | mask, np.clip(projection[..., colour_id] / full, 0.0, 1.0), 0.0)
        area = float(coverage.sum())
        ys, xs = np.mgrid[0 : coverage.shape[0], 0 : coverage.shape[1]] + 0.5  # pixel centres
        centre = (float((coverage * xs).sum() / area), float((coverage * ys).sum() / area))
        objects.append(DetectedObject(int(colour_id), area, centre, coverage))
    return sorted(objects, key=lambda o: -o.area)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by one pixel (4-neighbourhood)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _template_geometry(shape: str) -> tuple[float, float]:
    """(area / half^2, centroid-below-centre / half) of a shape as the renderer draws it."""
    resolution, half = 64, 24.0  # output pixels; large, so the measure is exact to a few per mille
    side = resolution * SUPERSAMPLE
    cover = embedded.shape_coverage(shape, side / 2, side / 2, half * SUPERSAMPLE, resolution)[..., 0]
    ys = np.arange(resolution)[:, None] + 0.5
    area = float(cover.sum())
    return area / half**2, (float((cover * ys).sum()) / area - resolution / 2) / half


def match_shape(obj: DetectedObject, scales: Sequence[float] = (0.9, 1.0, 1.1)) -> tuple[int, np.ndarray]:
    """The shape id whose rendered mask best fits ``obj.coverage``, and the L1 error (S,) of every shape.

    Each shape's mask is drawn by the dataset's renderer with the object's area (times each of ``scales``)
    and its centroid on the object's centroid; the error of a shape is its smallest over the scales.
    """
    resolution = obj.coverage.shape[0]
    canvas = SUPERSAMPLE
    errors = np.empty(len(SHAPES))
    for shape_id, shape in enumerate(SHAPES):
        unit_area, centroid_drop = _template_geometry(shape)
        best = np.inf
        for scale in scales:
            half = np.sqrt(obj.area / unit_area) * scale  # output pixels
            cx, cy = obj.centre[0], obj.centre[1] - centroid_drop * half
            template = embedded.shape_coverage(shape, cx * canvas, cy * canvas, half * canvas, resolution)[..., 0]
            best = min(best, float(np.abs(template - obj.coverage).sum()))
        errors[shape_id] = best
    return int(errors.argmin()), errors


def relation_of(a: DetectedObject, b: DetectedObject) -> str:
    """Where ``a`` is seen from ``b``: the larger of the horizontal and vertical centroid offsets decides."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def score_single(image: np.ndarray | torch.Tensor, colour: str | int, shape: str | int) -> dict[str, bool]:
    """Does a one-object image show ``colour`` ``shape``?

    Returns:
        ``colour`` (the largest object has the colour), ``shape`` (its shape matches best, and its colour
        is right: the shape of a wrong object does not count), ``single`` (no second object), ``all``.
    """
    target = item(colour, shape)
    objects = find_objects(image)
    colour_ok = bool(objects) and COLOURS[objects[0].colour_id] == target.colour
    shape_ok = colour_ok and SHAPES[match_shape(objects[0])[0]] == target.shape
    single = len(objects) == 1
    return {"colour": colour_ok, "shape": shape_ok, "single": single, "all": colour_ok and shape_ok and single}


def score_pair(image: np.ndarray | torch.Tensor, a: Item, relation: str, b: Item) -> dict[str, bool]:
    """Does a two-object image show ``a`` ``relation`` ``b`` (e.g. a red circle left of a yellow triangle)?

    Objects are found by colour, so ``a`` and ``b`` must differ in colour.

    Returns:
        ``colours`` (exactly the two colours are objects), ``relation`` (both colours present and ``a``'s
        centroid lies in ``relation`` to ``b``'s along the axis of their larger offset), ``shapes`` (both
        colours present and each object's best-matching shape is the asked one), ``all``.
    """
    a, b = item(*a), item(*b)
    if relation not in RELATIONS:
        raise ScorerError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    if a.colour == b.colour:
        raise ScorerError(f"the two objects must differ in colour, got two {a.colour} objects")
    found = {COLOURS[o.colour_id]: o for o in find_objects(image)}
    present = a.colour in found and b.colour in found
    colours = present and len(found) == 2
    relation_ok = present and relation_of(found[a.colour], found[b.colour]) == relation
    shapes = present and all(SHAPES[match_shape(found[o.colour])[0]] == o.shape for o in (a, b))
    return {"colours": colours, "relation": relation_ok, "shapes": shapes, "all": colours and relation_ok and shapes}


def adherence(images: Sequence | torch.Tensor, targets: Sequence[Mapping]) -> dict[str, float]:
    """Mean pixel-scorer results over images, each with its intended attributes.

    Args:
        images: N images, each (H, W, 3) or (3, H, W), uint8 or float in [0, 1]; or one (N, 3, H, W) tensor.
        targets: N dicts; a single object ``{"colour", "shape"}`` or a pair ``{"colour", "shape",
            "relation", "colour_b", "shape_b"}`` (the columns of the compositional dataset and of
            :func:`~diffdis.eval.compositional.relation_prompts`).

    Returns:
        ``objects/single_<criterion>`` and ``objects/pair_<criterion>`` fractions (criteria of
        :func:`score_single` and :func:`score_pair`) with ``objects/num_single`` and ``objects/num_pair``.
    """
    if len(images) != len(targets):
        raise ScorerError(f"{len(images)} images but {len(targets)} targets")
    results: dict[str, list[dict[str, bool]]] = {"single": [], "pair": []}
    for image, target in zip(images, targets):
        if target.get("relation") is not None:
            a, b = Item(target["colour"], target["shape"]), Item(target["colour_b"], target["shape_b"])
            results["pair"].append(score_pair(image, a, target["relation"], b))
        else:
            results["single"].append(score_single(image, target["colour"], target["shape"]))
    metrics: dict[str, float] = {}
    for kind, scores in results.items():
        metrics[f"objects/num_{kind}"] = float(len(scores))
        for criterion in scores[0] if scores else ():
            metrics[f"objects/{kind}_{criterion}"] = float(np.mean([s[criterion] for s in scores]))
    return metrics

