"""The embedded dataset's pixels and captions are pinned: refactoring its drawing code must not change them.

The digests were taken before the drawing helpers were shared with the compositional dataset. Decoded
pixels are hashed rather than PNG bytes, so a different zlib does not fail the test.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from diffdis.data.embedded import make_embedded_dataset

PINNED = [
    ("train", 12, 16, 0, "f5b7bad1caeec5f40c2027f9c75264302dd455f1b790f70a9fffea2c998815ab"),
    ("test", 8, 32, 0, "b15f4dac34ca3110e5d3c74c56ddf17712b84cc0fb036361b1fe64e7ae57cc83"),
    ("validation", 8, 16, 5, "7703afb53c26cdf00c4c051b95bee40cc21a2ba157634615244b913f98482217"),
]


@pytest.mark.parametrize("split, num, resolution, seed, digest", PINNED)
def test_embedded_images_and_captions_unchanged(split: str, num: int, resolution: int, seed: int, digest: str) -> None:
    ds = make_embedded_dataset(split, num, resolution=resolution, seed=seed)
    h = hashlib.sha256()
    for row in ds:
        h.update(np.asarray(row["image"], dtype=np.uint8).tobytes())
        h.update("|".join([row["caption"], *row["captions"]]).encode())
    assert h.hexdigest() == digest
