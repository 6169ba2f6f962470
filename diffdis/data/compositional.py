"""Compositional procedural dataset: held-out colour x shape combinations and two-object spatial relations.

The embedded shapes are solved perfectly; this dataset, drawn with the same renderer (shapes, colours,
jitter, dark background: :mod:`diffdis.data.embedded`), asks for what they do not test:

* **Single-object images**, exactly like the embedded ones (shape x colour x size x position, the same six
  caption phrasings), except that the six colour x shape combinations of :data:`HELD_OUT` (one per colour
  and one per shape, so every colour and every shape is still seen) never appear in train. In validation
  and test every other single-object image shows a held-out combination.
* **Two-object images** with a spatial relation, "a red circle left of a yellow triangle" (relations
  :data:`RELATIONS`). The two objects differ in colour and in shape, and neither is a held-out
  combination. Train draws every such pair; validation and test draw only the six :data:`PROBE_PAIRS`
  (each colour and each shape in two of them), so the relation task has a fixed list of classes.

Images alternate: even indices are single-object, odd indices two-object. Each kind has its own random
stream, so ``kind="single"`` (or ``"pair"``) builds the same images of that kind without the others.
Captions name positions and left/right, so transforms must never flip these images.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

import datasets
import numpy as np
from PIL import Image

from diffdis.data import embedded
from diffdis.data.embedded import COLOURS, POSITIONS, SHAPES, SIZES, SUPERSAMPLE, attribute_name


class Item(NamedTuple):
    """One coloured shape, e.g. ``Item("red", "circle")`` ("red circle")."""

    colour: str
    shape: str

    def describe(self) -> str:
        """Its words in a caption: ``"red circle"``."""
        return f"{self.colour} {self.shape}"


# One combination per colour and per shape (colour i with shape i + 1): held out of every train image.
HELD_OUT: tuple[Item, ...] = tuple(Item(COLOURS[i], SHAPES[(i + 1) % len(SHAPES)]) for i in range(len(COLOURS)))
# The pairs of the validation/test two-object images: colour i + shape i with colour i + 3 + shape i + 2,
# so each colour and each shape is in two pairs and no object is held out.
PROBE_PAIRS: tuple[tuple[Item, Item], ...] = tuple(
    (Item(COLOURS[i], SHAPES[i]), Item(COLOURS[(i + 3) % 6], SHAPES[(i + 2) % 6])) for i in range(6)
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # where object a is, seen from b
_INVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Direction of object a from the image centre (object b is mirrored), per relation.
_RELATION_DIRECTION: dict[str, tuple[int, int]] = {
    "left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1),
}
_PAIR_PHRASINGS: tuple[str, ...] = ("a {a} {rel} a {b}", "a picture of a {a} {rel} a {b}", "{a} {rel} {b}")

# Bounding-box side of each of the two objects, as a fraction of the image side (embedded "small": 0.44).
PAIR_SIZE_FRACTION = 0.38
# Distance of each object centre from the image centre along the relation's axis (fraction of the side):
# with the jitter below, the two objects never touch and stay inside the frame.
_PAIR_OFFSET = 0.24

KINDS: tuple[str, ...] = ("single", "pair")
SPLIT_SIZES: dict[str, int] = {"train": 20000, "validation": 2000, "test": 2000}
# Sub-streams of embedded.split_rng, distinct from the embedded dataset's own stream.
_KIND_STREAM: dict[str, int] = {"single": 101, "pair": 102}


class CompositionalError(ValueError):
    """A bad argument of the compositional dataset (unknown kind, relation, colour or shape)."""


def item(colour: str | int, shape: str | int) -> Item:
    """The :class:`Item` of a colour and a shape (names or ids), checked."""
    return Item(attribute_name(COLOURS, colour, "colour"), attribute_name(SHAPES, shape, "shape"))


def is_held_out(colour: str, shape: str) -> bool:
    """True for the colour x shape combinations kept out of train (:data:`HELD_OUT`)."""
    return Item(colour, shape) in HELD_OUT


def _relation(relation: str) -> str:
    if relation not in RELATIONS:
        raise CompositionalError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    return relation


def inverse_relation(relation: str) -> str:
    """The relation of b seen from a: ``"left of"`` <-> ``"right of"``, ``"above"`` <-> ``"below"``."""
    return _INVERSE[_relation(relation)]


def pair_caption(a: Item, relation: str, b: Item, phrasing: int = 0) -> str:
    """Caption "a red circle left of a yellow triangle" in phrasing ``phrasing`` (0..2)."""
    if not 0 <= phrasing < len(_PAIR_PHRASINGS):
        raise CompositionalError(f"phrasing {phrasing} out of range 0..{len(_PAIR_PHRASINGS) - 1}")
    return _PAIR_PHRASINGS[phrasing].format(a=a.describe(), rel=_relation(relation), b=b.describe())


def pair_captions(a: Item, relation: str, b: Item) -> list[str]:
    """Every true caption of a two-object image: each phrasing, naming a first and then b first."""
    inverse = inverse_relation(relation)
    return [pair_caption(a, relation, b, p) for p in range(len(_PAIR_PHRASINGS))] + [
        pair_caption(b, inverse, a, p) for p in range(len(_PAIR_PHRASINGS))
    ]


def render_pair(
    a: Item, relation: str, b: Item, resolution: int = 16, rng: np.random.Generator | None = None
) -> Image.Image:
    """Render object ``a`` in ``relation`` to object ``b`` (e.g. a "left of" b) on the embedded dark background.

    Args:
        a, b: the two objects; they must differ in colour (they may not overlap: they never do).
        relation: one of :data:`RELATIONS`.
        resolution: output side in pixels.
        rng: source of the jitter (layout shift, per-object shift, scale, brightness, hue, noise);
            ``None`` uses a fixed seed.
    """
    a, b = item(*a), item(*b)
    dx, dy = _RELATION_DIRECTION[_relation(relation)]
    if a.colour == b.colour:
        raise CompositionalError(f"the two objects must differ in colour, got two {a.colour} objects")
    rng = np.random.default_rng(0) if rng is None else rng
    # The jitter is always drawn in this order, so one rng gives one reproducible stream.
    layout_shift = rng.uniform(-0.015, 0.015, size=2)
    along = rng.uniform(-0.02, 0.02, size=2)
    across = rng.uniform(-0.03, 0.03, size=2)
    scale = rng.uniform(0.93, 1.07, size=2)
    brightness = rng.uniform(0.82, 1.0, size=2)
    hue_shift = rng.normal(0.0, 8.0, size=(2, 3))
    background = rng.uniform(0.0, 18.0)
    noise = rng.normal(0.0, 3.0, size=(resolution, resolution, 3))

    side = resolution * SUPERSAMPLE
    layers = []
    for k, (obj, sign) in enumerate(((a, 1), (b, -1))):
        shift = sign * _PAIR_OFFSET + along[k]
        fx = 0.5 + layout_shift[0] + (shift * dx if dx else across[k])
        fy = 0.5 + layout_shift[1] + (shift * dy if dy else across[k])
        half = 0.5 * side * PAIR_SIZE_FRACTION * scale[k]
        cover = embedded.shape_coverage(obj.shape, side * fx, side * fy, half, resolution)
        layers.append((cover, embedded.shape_rgb(obj.colour, brightness[k], hue_shift[k])))
    return embedded.composite(background, layers, noise)


def _features() -> datasets.Features:
    text, integer = datasets.Value("string"), datasets.Value("int64")
    return datasets.Features(
        {
            "image": datasets.Image(),
            "caption": text,
            "captions": datasets.List(text),
            "kind": text,  # "single" or "pair"
            "heldout": datasets.Value("bool"),  # shows a HELD_OUT combination
            "shape": text,  # the object, or object a of a pair
            "colour": text,
            "shape_id": integer,
            "colour_id": integer,
            "size": text,  # single-object images only (None for pairs)
            "position": text,
            "size_id": integer,
            "position_id": integer,
            "shape_b": text,  # pairs only (None for single-object images)
            "colour_b": text,
            "shape_b_id": integer,
            "colour_b_id": integer,
            "relation": text,  # a <relation> b
            "relation_id": integer,
        }
    )


def _blocks(combos: list, rng: np.random.Generator) -> Iterator:
    """Endless shuffled blocks of all ``combos``, so every combination is (almost) equally frequent."""
    while True:
        for index in rng.permutation(len(combos)):
            yield combos[index]


def _single_combos(held_out: bool) -> list[tuple[str, str, str, str]]:
    return [
        (s, c, z, p)
        for s in SHAPES
        for c in COLOURS
        if is_held_out(c, s) == held_out
        for z in SIZES
        for p in POSITIONS
    ]


def _single_rows(split: str, seed: int, resolution: int) -> Iterator[dict]:
    """Rows of the single-object images: train never shows HELD_OUT; elsewhere every other image does."""
    rng = embedded.split_rng(split, seed, _KIND_STREAM["single"])
    if split == "train":
        combos: Iterator = _blocks(_single_combos(held_out=False), rng)
    else:
        seen, unseen = _blocks(_single_combos(False), rng), _blocks(_single_combos(True), rng)
        combos = (next(unseen) if j % 2 == 0 else next(seen) for j in itertools.count())
    for shape, colour, size, position in combos:
        captions = embedded.all_captions(shape, colour, size, position)
        phrasing = int(rng.integers(len(captions)))
        image = embedded.render_image(shape, colour, size, position, resolution=resolution, rng=rng)
        yield {
            "image": image, "caption": captions[phrasing], "captions": captions, "kind": "single",
            "heldout": is_held_out(colour, shape), "shape": shape, "colour": colour,
            "shape_id": SHAPES.index(shape), "colour_id": COLOURS.index(colour),
            "size": size, "position": position, "size_id": SIZES.index(size),
            "position_id": POSITIONS.index(position),
        }


def _pair_combos(split: str) -> list[tuple[Item, str, Item]]:
    if split != "train":
        return [(x, r, y) for p in PROBE_PAIRS for x, y in (p, p[::-1]) for r in RELATIONS]
    seen = [Item(c, s) for c in COLOURS for s in SHAPES if not is_held_out(c, s)]
    return [
        (a, r, b) for a in seen for b in seen if a.colour != b.colour and a.shape != b.shape for r in RELATIONS
    ]


def _pair_rows(split: str, seed: int, resolution: int) -> Iterator[dict]:
    """Rows of the two-object images: every non-held-out pair in train, the PROBE_PAIRS elsewhere."""
    rng = embedded.split_rng(split, seed, _KIND_STREAM["pair"])
    for a, relation, b in _blocks(_pair_combos(split), rng):
        captions = pair_captions(a, relation, b)
        phrasing = int(rng.integers(len(captions)))
        yield {
            "image": render_pair(a, relation, b, resolution, rng), "caption": captions[phrasing],
            "captions": captions, "kind": "pair", "heldout": False, "shape": a.shape, "colour": a.colour,
            "shape_id": SHAPES.index(a.shape), "colour_id": COLOURS.index(a.colour),
            "shape_b": b.shape, "colour_b": b.colour, "shape_b_id": SHAPES.index(b.shape),
            "colour_b_id": COLOURS.index(b.colour), "relation": relation,
            "relation_id": RELATIONS.index(relation),
        }


def make_compositional_dataset(
    split: str,
    num_samples: int | None = None,
    resolution: int = 16,
    seed: int = 0,
    kind: str | None = None,
) -> datasets.Dataset:
    """Build one split of the compositional dataset in memory.

    The same arguments always give identical images and captions, and the first ``n`` images do not
    depend on ``num_samples``.

    Args:
        split: "train", "validation" or "test" (disjoint random streams).
        num_samples: number of images; default SPLIT_SIZES[split] (half of it with ``kind``).
        resolution: image side in pixels (two objects stay apart and recognisable from 16 px).
        seed: base seed.
        kind: None for both kinds, alternating (single-object first); "single" or "pair" for the
            images of one kind only (the same images as in the mixed split, in the same order).

    Returns:
        A Dataset with columns image, caption, captions (every true caption), kind, heldout, shape,
        colour, shape_id, colour_id (the object, or object a), size, position, size_id, position_id
        (single-object images; None for pairs), shape_b, colour_b, shape_b_id, colour_b_id, relation,
        relation_id (pairs: "a <relation> b"; None for single-object images).
    """
    embedded.split_rng(split, seed)  # checks the split
    if kind is not None and kind not in KINDS:
        raise CompositionalError(f"unknown kind {kind!r}; expected one of {KINDS} or None")
    if num_samples is None:
        num_samples = SPLIT_SIZES[split] if kind is None else SPLIT_SIZES[split] // 2
    if num_samples < 0:
        raise CompositionalError(f"num_samples must be >= 0, got {num_samples}")
    streams = {"single": _single_rows(split, seed, resolution), "pair": _pair_rows(split, seed, resolution)}
    if kind is None:
        rows: Iterator[dict] = (next(streams[KINDS[i % 2]]) for i in itertools.count())
    else:
        rows = streams[kind]
    features = _features()
    columns: dict[str, list] = {name: [] for name in features}
    for row in itertools.islice(rows, num_samples):
        row["image"] = {"bytes": embedded.png_bytes(row["image"]), "path": None}
        for name in columns:
            columns[name].append(row.get(name))
    return datasets.Dataset.from_dict(columns, features=features, split=datasets.Split(split))


def make_compositional_dataset_dict(
    resolution: int = 16, seed: int = 0, sizes: dict[str, int] | None = None
) -> datasets.DatasetDict:
    """All splits of the compositional dataset; ``sizes`` overrides the per-split sample counts."""
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    return datasets.DatasetDict(
        {split: make_compositional_dataset(split, sizes[split], resolution, seed) for split in SPLIT_SIZES}
    )
