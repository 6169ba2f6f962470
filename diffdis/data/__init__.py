"""Data: the embedded and compositional shapes datasets, HF ``datasets`` loading, transforms and the collator."""

from diffdis.data.compositional import make_compositional_dataset, make_compositional_dataset_dict
from diffdis.data.embedded import (
    COLOUR_RGB,
    COLOURS,
    NUM_PHRASINGS,
    POSITIONS,
    SHAPES,
    SIZES,
    all_captions,
    caption_for,
    class_prompt,
    export_imagefolder,
    make_embedded_dataset,
    make_embedded_dataset_dict,
    render_image,
)
from diffdis.data.loading import load_image_text_dataset
from diffdis.data.transforms import ImageTextCollator, decode_image, pick_caption

__all__ = [
    "COLOUR_RGB",
    "COLOURS",
    "NUM_PHRASINGS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "ImageTextCollator",
    "all_captions",
    "caption_for",
    "class_prompt",
    "decode_image",
    "export_imagefolder",
    "load_image_text_dataset",
    "make_compositional_dataset",
    "make_compositional_dataset_dict",
    "make_embedded_dataset",
    "make_embedded_dataset_dict",
    "pick_caption",
    "render_image",
]
