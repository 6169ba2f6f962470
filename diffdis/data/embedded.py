"""Embedded procedural image-text dataset: coloured shapes on a dark background.

Every image has known attributes (shape, colour, size, position), so the dataset gives exact
zero-shot labels and lets generated images be scored for prompt adherence. Images are drawn at
4x the target resolution and box-downsampled, so edges stay clean even at 16x16 pixels.

Captions name the position ("on the left"), so transforms must never flip these images.
"""

from __future__ import annotations

import io
import json
import os
import textwrap
from collections.abc import Sequence

import datasets
import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Nominal RGB of each colour (aligned with COLOURS); rendered pixels are jittered around it.
COLOUR_RGB: tuple[tuple[int, int, int], ...] = (
    (225, 35, 35),
    (35, 205, 55),
    (45, 85, 240),
    (235, 220, 35),
    (225, 45, 225),
    (35, 215, 225),
)

# Bounding-box side of a shape as a fraction of the image side (aligned with SIZES).
SIZE_FRACTION: tuple[float, ...] = (0.44, 0.64)
# Shift of the shape centre from the image centre, as a fraction of the side (per size):
# large enough to be visible at 16 px, small enough to keep the shape inside the frame.
_POSITION_SHIFT: tuple[float, ...] = (0.24, 0.17)
_POSITION_DIRECTION: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "center": (0, 0),
}
_POSITION_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_PHRASINGS: tuple[str, ...] = (
    "a {colour} {shape}",
    "a {size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape} {where}",
    "{colour} {shape}, {size}, {position}",
    "a {colour} {shape} {where}",
    "a {shape} shape coloured {colour}",
)
NUM_PHRASINGS: int = len(_PHRASINGS)

SPLIT_SIZES: dict[str, int] = {"train": 20000, "validation": 1000, "test": 1000}
# Fixed stream index per split, so splits never share random numbers.
_SPLIT_STREAM: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
SUPERSAMPLE = 4  # drawing canvas / output side


def attribute_name(values: tuple[str, ...], value: str | int, kind: str) -> str:
    """Return the attribute name for a name or an id, checking it is valid."""
    if isinstance(value, (int, np.integer)):
        if not 0 <= int(value) < len(values):
            raise ValueError(f"{kind} id {value} out of range 0..{len(values) - 1}")
        return values[int(value)]
    if value not in values:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {values}")
    return value


def caption_for(shape: str, colour: str, size: str, position: str, phrasing: int) -> str:
    """Caption of an image with these attributes in phrasing ``phrasing`` (0..NUM_PHRASINGS-1)."""
    if not 0 <= phrasing < NUM_PHRASINGS:
        raise ValueError(f"phrasing {phrasing} out of range 0..{NUM_PHRASINGS - 1}")
    return _PHRASINGS[phrasing].format(
        shape=attribute_name(SHAPES, shape, "shape"),
        colour=attribute_name(COLOURS, colour, "colour"),
        size=attribute_name(SIZES, size, "size"),
        position=attribute_name(POSITIONS, position, "position"),
        where=_POSITION_PHRASE[attribute_name(POSITIONS, position, "position")],
    )


def all_captions(shape: str, colour: str, size: str, position: str) -> list[str]:
    """All NUM_PHRASINGS captions of one attribute combination."""
    return [caption_for(shape, colour, size, position, p) for p in range(NUM_PHRASINGS)]


def class_prompt(
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    position: str | None = None,
) -> str:
    """Zero-shot class prompt naming only the given attributes, e.g. ``class_prompt(colour="red")``
    -> "a red shape", ``class_prompt("circle", "red")`` -> "a red circle".

    Uses only words that occur in the captions (including "shape"), so a tokenizer trained
    on the captions covers every prompt.
    """
    words = ["a"]
    if size is not None:
        words.append(attribute_name(SIZES, size, "size"))
    if colour is not None:
        words.append(attribute_name(COLOURS, colour, "colour"))
    words.append(attribute_name(SHAPES, shape, "shape") if shape is not None else "shape")
    if position is not None:
        words.append(_POSITION_PHRASE[attribute_name(POSITIONS, position, "position")])
    return " ".join(words)


def draw_shape_mask(shape: str, cx: float, cy: float, half: float, side: int) -> Image.Image:
    """Binary mask ("L", 0/255) of a shape centred at (cx, cy) with bounding half-width ``half``."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        h = half * 0.88  # a square looks bigger than a circle of the same box
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=255)
    elif shape == "diamond":
        # Taller than wide, so it does not read as a circle at 16 px; a bit over the box
        # because a rhombus covers only half of it.
        w, h = half * 0.8, half * 1.1
        draw.polygon([(cx, cy - h), (cx + w, cy), (cx, cy + h), (cx - w, cy)], fill=255)
    elif shape == "cross":
        t = half * 0.34
        draw.rectangle((cx - t, cy - half, cx + t, cy + half), fill=255)
        draw.rectangle((cx - half, cy - t, cx + half, cy + t), fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        r = half * 0.5
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def render_image(
    shape: str | int,
    colour: str | int,
    size: str | int,
    position: str | int,
    resolution: int = 16,
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Render one RGB image of a coloured shape on a dark, slightly noisy background.

    Args:
        shape, colour, size, position: attribute names (or ids).
        resolution: output side in pixels.
        rng: source of the per-image jitter (position, scale, brightness, hue, noise);
            ``None`` uses a fixed seed.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    shape, colour = attribute_name(SHAPES, shape, "shape"), attribute_name(COLOURS, colour, "colour")
    size_id = SIZES.index(attribute_name(SIZES, size, "size"))
    dx, dy = _POSITION_DIRECTION[attribute_name(POSITIONS, position, "position")]
    # The jitter is always drawn in this order, so one rng gives one reproducible stream.
    jitter_xy = rng.uniform(-0.025, 0.025, size=2)
    scale = rng.uniform(0.93, 1.07)
    brightness = rng.uniform(0.82, 1.0)
    hue_shift = rng.normal(0.0, 8.0, size=3)
    background = rng.uniform(0.0, 18.0)
    noise = rng.normal(0.0, 3.0, size=(resolution, resolution, 3))

    side = resolution * SUPERSAMPLE
    shift = _POSITION_SHIFT[size_id]
    cx = side * (0.5 + dx * shift + jitter_xy[0])
    cy = side * (0.5 + dy * shift + jitter_xy[1])
    half = 0.5 * side * SIZE_FRACTION[size_id] * scale
    cover = shape_coverage(shape, cx, cy, half, resolution)
    return composite(background, [(cover, shape_rgb(colour, brightness, hue_shift))], noise)


def shape_coverage(shape: str, cx: float, cy: float, half: float, resolution: int) -> np.ndarray:
    """Coverage (H, W, 1) in [0, 1] of a shape drawn on the ``SUPERSAMPLE``x canvas and box-downsampled.

    ``cx``, ``cy`` (centre) and ``half`` (bounding half-width) are in canvas pixels, i.e. output pixels
    times ``SUPERSAMPLE``.
    """
    side = resolution * SUPERSAMPLE
    mask = draw_shape_mask(shape, cx, cy, half, side).resize((resolution, resolution), Image.BOX)
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0  # (H, W, 1) coverage


def shape_rgb(colour: str, brightness: float, hue_shift: np.ndarray) -> np.ndarray:
    """Rendered RGB (3,) of a colour name: its nominal RGB scaled by ``brightness`` plus ``hue_shift``."""
    return np.asarray(COLOUR_RGB[COLOURS.index(colour)], dtype=np.float64) * brightness + hue_shift


def composite(
    background: float, layers: Sequence[tuple[np.ndarray, np.ndarray]], noise: np.ndarray
) -> Image.Image:
    """Paint non-overlapping shapes ``(coverage (H, W, 1), rgb (3,))`` over a flat ``background`` plus ``noise``."""
    cover = sum(c for c, _ in layers)
    paint = sum(rgb * c for c, rgb in layers)
    pixels = background * (1.0 - cover) + paint + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def split_rng(split: str, seed: int, *streams: int) -> np.random.Generator:
    """The random stream of one split; ``streams`` name sub-streams of it (another dataset, a kind of image)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(_SPLIT_STREAM)}")
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split], *streams]))


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes of an image (fast compression: the images are tiny)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _features() -> datasets.Features:
    text, integer = datasets.Value("string"), datasets.Value("int64")
    return datasets.Features(
        {
            "image": datasets.Image(),
            "caption": text,
            "captions": datasets.List(text),
            "shape": text,
            "colour": text,
            "size": text,
            "position": text,
            "shape_id": integer,
            "colour_id": integer,
            "size_id": integer,
            "position_id": integer,
        }
    )


def make_embedded_dataset(
    split: str, num_samples: int | None = None, resolution: int = 16, seed: int = 0
) -> datasets.Dataset:
    """Build one split of the embedded shapes dataset in memory.

    Attribute combinations are drawn as shuffled blocks of all combinations, so every class is
    (almost) equally frequent. The first ``n`` samples do not depend on ``num_samples``, and the
    same arguments always give identical image bytes and captions.

    Args:
        split: "train", "validation" or "test" (disjoint random streams).
        num_samples: number of images; default SPLIT_SIZES[split].
        resolution: image side in pixels.
        seed: base seed.

    Returns:
        A Dataset with columns image, caption (one phrasing), captions (all phrasings),
        shape, colour, size, position (str) and shape_id, colour_id, size_id, position_id (int).
    """
    rng = split_rng(split, seed)
    n = SPLIT_SIZES[split] if num_samples is None else int(num_samples)
    combos = [
        (s, c, z, p)
        for s in range(len(SHAPES))
        for c in range(len(COLOURS))
        for z in range(len(SIZES))
        for p in range(len(POSITIONS))
    ]
    columns: dict[str, list] = {name: [] for name in _features()}
    order: np.ndarray = np.empty(0, dtype=np.int64)
    for i in range(n):
        if i % len(combos) == 0:
            order = rng.permutation(len(combos))
        ids = combos[order[i % len(combos)]]
        names = (SHAPES[ids[0]], COLOURS[ids[1]], SIZES[ids[2]], POSITIONS[ids[3]])
        captions = all_captions(*names)
        phrasing = int(rng.integers(NUM_PHRASINGS))
        image = render_image(*names, resolution=resolution, rng=rng)
        columns["image"].append({"bytes": png_bytes(image), "path": None})
        columns["caption"].append(captions[phrasing])
        columns["captions"].append(captions)
        for key, name, idx in zip(("shape", "colour", "size", "position"), names, ids):
            columns[key].append(name)
            columns[f"{key}_id"].append(idx)
    return datasets.Dataset.from_dict(columns, features=_features(), split=datasets.Split(split))


def make_embedded_dataset_dict(
    resolution: int = 16, seed: int = 0, sizes: dict[str, int] | None = None
) -> datasets.DatasetDict:
    """All splits of the embedded dataset; ``sizes`` overrides the per-split sample counts."""
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    return datasets.DatasetDict(
        {
            split: make_embedded_dataset(split, sizes[split], resolution=resolution, seed=seed)
            for split in SPLIT_SIZES
        }
    )


def _image_bytes(value: object) -> bytes:
    """PNG/JPEG bytes of a datasets image value (PIL image or {"bytes", "path"} dict)."""
    if isinstance(value, Image.Image):
        return png_bytes(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    if isinstance(value, dict) and value.get("path"):
        with open(value["path"], "rb") as handle:
            return handle.read()
    raise TypeError(f"cannot export image value of type {type(value).__name__}")


def export_imagefolder(dataset_dict: datasets.DatasetDict, out_dir: str | os.PathLike) -> str:
    """Write ``out_dir/<split>/<idx>.png`` and ``out_dir/<split>/metadata.jsonl``.

    The result is the HF ``imagefolder`` format: ``load_dataset("imagefolder", data_dir=out_dir)``
    loads it back with every non-image column. Returns ``out_dir``.
    """
    out_dir = os.fspath(out_dir)
    for split, dataset in dataset_dict.items():
        split_dir = os.path.join(out_dir, split)
        os.makedirs(split_dir, exist_ok=True)
        raw = dataset.cast_column("image", datasets.Image(decode=False))
        other = [c for c in raw.column_names if c != "image"]
        with open(os.path.join(split_dir, "metadata.jsonl"), "w", encoding="utf-8") as meta:
            for idx, row in enumerate(raw):
                file_name = f"{idx}.png"
                with open(os.path.join(split_dir, file_name), "wb") as handle:
                    handle.write(_image_bytes(row["image"]))
                record = {"file_name": file_name, **{c: row[c] for c in other}}
                meta.write(json.dumps(record) + "\n")
    return out_dir


def render_preview_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    scale: int = 4,
    columns: int = 8,
    text_width: int = 24,
) -> Image.Image:
    """A grid of images upscaled ``scale``x (nearest) with a wrapped caption under each."""
    if not images:
        raise ValueError("no images to preview")
    w, h = images[0].size
    cell_w = max(w * scale, text_width * 6) + 8
    cell_h = h * scale + 40
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 2
        grid.paste(image.convert("RGB").resize((w * scale, h * scale), Image.NEAREST), (x, y))
        text = "\n".join(textwrap.wrap(caption, text_width)[:3])
        draw.multiline_text((x, y + h * scale + 2), text, fill=(0, 0, 0), spacing=1)
    return grid
