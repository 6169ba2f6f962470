"""Image grids with optional captions (PIL only, default bitmap font)."""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

CAPTION_LINE_HEIGHT = 12  # pixels per caption line with PIL's default bitmap font
CAPTION_MARGIN = 2


def _caption_lines(caption: str, width: int) -> list[str]:
    """Wrap ``caption`` to the tile width (the default font is about 6 px per character)."""
    chars = max(4, width // 6)
    return textwrap.wrap(caption, width=chars) or [""]


def make_grid(
    images: Sequence[Image.Image],
    captions: Optional[Sequence[str]] = None,
    ncols: Optional[int] = None,
    upscale: int = 1,
) -> Image.Image:
    """Tile ``images`` row by row into one RGB image, each with its caption underneath.

    Args:
        images: equally sized or not (tiles take the largest size); upscaled with nearest neighbour.
        captions: one string per image, or None for no caption band.
        ncols: tiles per row; default ``ceil(sqrt(n))``.
        upscale: integer nearest-neighbour factor, so 8x8 or 16x16 samples stay legible.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    tiles = [im.convert("RGB") for im in images]
    if upscale > 1:
        tiles = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in tiles]
    n = len(tiles)
    ncols = ncols or max(1, int(n**0.5 + 0.999999))
    nrows = (n + ncols - 1) // ncols
    tile_w = max(im.width for im in tiles)
    tile_h = max(im.height for im in tiles)
    wrapped = [_caption_lines(c, tile_w) for c in captions] if captions is not None else None
    band = (max(len(lines) for lines in wrapped) * CAPTION_LINE_HEIGHT + 2 * CAPTION_MARGIN) if wrapped else 0
    cell_w, cell_h = tile_w + 2 * CAPTION_MARGIN, tile_h + band + 2 * CAPTION_MARGIN
    grid = Image.new("RGB", (ncols * cell_w, nrows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, tile in enumerate(tiles):
        x, y = (i % ncols) * cell_w + CAPTION_MARGIN, (i // ncols) * cell_h + CAPTION_MARGIN
        grid.paste(tile, (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + tile_h + CAPTION_MARGIN + j * CAPTION_LINE_HEIGHT), line, fill="black", font=font)
    return grid
