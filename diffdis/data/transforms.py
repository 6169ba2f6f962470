"""Image decoding, caption choice and the batch collator (torch, PIL and numpy only).

Random choices (caption phrasing, crop offset, flip) use torch's global RNG, so
``Accelerator.save_state`` / ``load_state`` restore them and resumed runs are reproducible.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("diffdis.data")

_LOG_EVERY = 100


def decode_image(value: Any) -> Image.Image | None:
    """Decode an image value to an RGB PIL image, or return None if it cannot be read.

    Accepts a PIL image, a datasets ``Image(decode=False)`` dict (``{"bytes", "path"}``),
    raw bytes, a file path or an (H, W[, C]) uint8 array. Never raises.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, Mapping):
            if value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(value["path"])
            else:
                return None
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, str):
            image = Image.open(value)
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        else:
            return None
        image.load()  # force the full decode here, so truncated files fail inside the try
        return image.convert("RGB")
    except Exception:  # noqa: BLE001 - any unreadable image is skipped, whatever the cause
        return None


def _random_index(n: int, rng: torch.Generator | np.random.Generator | None) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    device = rng.device if rng is not None else "cpu"
    return int(torch.randint(n, (1,), generator=rng, device=device).item())


def caption_options(value: Any) -> list[str]:
    """The non-empty, stripped captions of one example (a string or a list of strings)."""
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [v.strip() for v in value if isinstance(v, str) and v.strip()]
    return []


def choose_captions(options: Sequence[Sequence[str]], generator: torch.Generator | None = None) -> list[str]:
    """One caption per example, drawn uniformly from its options with ``generator`` (CPU or CUDA)."""
    device = generator.device if generator is not None else "cpu"
    draws = torch.randint(2**62, (len(options),), generator=generator, device=device).tolist()  # one sync per batch
    return [opts[d % len(opts)] for opts, d in zip(options, draws)]


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, model_max_length), padded and truncated."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.long()


def pick_caption(
    value: Any, rng: torch.Generator | np.random.Generator | None = None
) -> str | None:
    """Choose the caption of one example.

    A string is returned stripped; a list of strings (several captions per image) gives a
    random non-empty one, drawn from ``rng`` (a torch or numpy generator; None uses torch's
    global RNG). Empty, whitespace-only or missing captions give None.
    """
    options = caption_options(value)
    return options[_random_index(len(options), rng)] if options else None


def resize_and_crop(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """Resize the shortest side to ``resolution`` (bicubic, antialiased), then crop a square.

    Args:
        center_crop: crop the centre; otherwise a random crop (from ``generator``, else torch's global RNG).
        random_flip: flip horizontally with probability 0.5. Leave it off for data whose
            captions name positions ("on the left"): a flip makes those captions false.
    """
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left = int(torch.randint(new_w - resolution + 1, (1,), generator=generator).item())
        top = int(torch.randint(new_h - resolution + 1, (1,), generator=generator).item())
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand((), generator=generator).item() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def to_pixel_values(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


def pixels_to_uint8(pixel_values: torch.Tensor) -> torch.Tensor | None:
    """The uint8 image (3, H, W) that :func:`to_pixel_values` made ``pixel_values`` from, or None when
    ``pixel_values`` did not come from one (``uint8_to_pixels`` of the result would not give it back bit for bit)."""
    image = ((pixel_values + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (3, H, W)
    return image if torch.equal(uint8_to_pixels(image), pixel_values) else None


def uint8_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, H, W) in [-1, 1], the same arithmetic as :func:`to_pixel_values`."""
    return image.to(torch.float32) / 127.5 - 1.0


class ImageTextCollator:
    """Turn a list of dataset examples into a model batch, dropping unusable examples.

    Output: ``pixel_values`` (B, 3, H, W) float32 in [-1, 1], ``input_ids`` (B, L) long padded
    to ``tokenizer.model_max_length``, and ``captions`` (list of B str). Examples whose image
    cannot be decoded or whose caption is empty are skipped and counted in ``num_skipped``
    (per process: each DataLoader worker holds its own copy). If every example of a batch is
    dropped the collator returns None.

    Args:
        tokenizer: a Hugging Face tokenizer.
        resolution: output image side.
        center_crop: centre crop (else random crop).
        random_flip: random horizontal flip. Off by default because flips falsify captions
            that name positions, such as those of the embedded dataset.
        caption_key: column with one caption (or a list of captions) per example.
        captions_key: optional column with all phrasings of a caption; when present, one is
            drawn at random.
        generator: the torch generator of the random choices (caption phrasing, crop, flip);
            None uses torch's global RNG.
        defer_choice: do not pick a caption nor tokenize; return ``caption_options`` (list of
            lists) instead, for the caller to draw from with :func:`choose_captions`. The trainer
            does this so that the draw comes from its checkpointed generator at the step itself:
            Accelerate's loader collates one batch ahead, so a draw made here would be consumed
            before a checkpoint that the batch comes after, and a resumed run would differ.
    """

    def __init__(
        self,
        tokenizer: Any,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_key: str = "caption",
        captions_key: str | None = "captions",
        generator: torch.Generator | None = None,
        defer_choice: bool = False,
    ) -> None:
        self.generator = generator
        self.defer_choice = defer_choice
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_key = caption_key
        self.captions_key = captions_key
        self.num_skipped = 0

    @property
    def deterministic(self) -> bool:
        """Whether :meth:`prepare` gives the same output for the same example every time (centre crop, no
        flip), so that its result may be kept and reused."""
        return self.center_crop and not self.random_flip

    def _options(self, example: Mapping[str, Any]) -> list[str]:
        if self.captions_key and example.get(self.captions_key):
            options = caption_options(example[self.captions_key])
            if options:
                return options
        return caption_options(example.get(self.caption_key))

    def _skip(self, reason: str) -> None:
        self.num_skipped += 1
        if self.num_skipped == 1 or self.num_skipped % _LOG_EVERY == 0:
            logger.warning("skipped an example (%s); %d skipped so far", reason, self.num_skipped)

    def prepare(self, example: Mapping[str, Any]) -> dict[str, Any] | None:
        """Decode one raw example: ``{"pixel_values": (3, H, W), "caption_options": [str, ...]}``,
        or None (counted in ``num_skipped``) when its caption is empty or its image unreadable."""
        opts = self._options(example)
        if not opts:
            self._skip("empty caption")
            return None
        image = decode_image(example.get("image"))
        if image is None:
            self._skip("unreadable image")
            return None
        image = resize_and_crop(image, self.resolution, self.center_crop, self.random_flip, self.generator)
        return {"pixel_values": to_pixel_values(image), "caption_options": opts}

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        """Collate raw examples (unusable ones dropped) or examples already ``prepare``-d.

        Prepared examples may carry ``num_replaced`` (unusable examples met and replaced before them,
        see :mod:`diffdis.data.replacing`) and ``stream_state``; the batch sums the first and keeps
        the last of the second.
        """
        prepared = [e if "pixel_values" in e else self.prepare(e) for e in examples]
        prepared = [e for e in prepared if e is not None]
        if not prepared:
            return None
        batch: dict[str, Any] = {"pixel_values": torch.stack([e["pixel_values"] for e in prepared]).contiguous()}  # (B, 3, H, W)
        batch["num_replaced"] = sum(int(e.get("num_replaced", 0)) for e in prepared)
        if "stream_state" in prepared[-1]:
            batch["stream_state"] = prepared[-1]["stream_state"]
        options = [e["caption_options"] for e in prepared]
        if self.defer_choice:
            batch["caption_options"] = options
            return batch
        captions = choose_captions(options, self.generator)
        batch["input_ids"] = tokenize(self.tokenizer, captions)  # (B, L)
        batch["captions"] = captions
        return batch
