"""Small on-disk datasets a user would bring (imagefolders, webdataset shards), some files corrupt."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image


CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def png_bytes(i: int, size: int = 16) -> bytes:
    """A small PNG whose colour depends on ``i``."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def caption(i: int) -> str:
    """The caption of example ``i`` (unique, so examples can be told apart by it)."""
    return f"a {['red', 'green', 'blue', 'yellow'][i % 4]} circle number {i}"


def write_imagefolder(root: Path, n: int, corrupt: Iterable[int] = ()) -> Path:
    """An imagefolder of ``n`` PNGs with metadata.jsonl; the indices in ``corrupt`` hold unreadable bytes."""
    root.mkdir(parents=True, exist_ok=True)
    bad = set(corrupt)
    with open(root / "metadata.jsonl", "w") as meta:
        for i in range(n):
            (root / f"{i:05d}.png").write_bytes(CORRUPT if i in bad else png_bytes(i))
            meta.write(json.dumps({"file_name": f"{i:05d}.png", "text": caption(i)}) + "\n")
    return root


def write_shards(root: Path, sizes: Sequence[int], corrupt: Iterable[int] = ()) -> list[str]:
    """Webdataset ``.tar`` shards of ``png``/``txt`` pairs, numbered across shards; ``corrupt`` holds global indices."""
    root.mkdir(parents=True, exist_ok=True)
    bad, paths, i = set(corrupt), [], 0
    for s, size in enumerate(sizes):
        path = root / f"shard-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                for ext, payload in (("png", CORRUPT if i in bad else png_bytes(i)), ("txt", caption(i).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                i += 1
        paths.append(str(path))
    return paths
