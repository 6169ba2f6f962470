"""Small on-disk datasets a user would bring (imagefolders, webdataset shards), some files corrupt, and a
launcher for ``tools/train.py`` under ``accelerate launch`` (one process, or two gloo processes on the CPU)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from helpers_tiny import free_port

ROOT = Path(__file__).resolve().parent.parent
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


def launch_train(args: Sequence[str], num_processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``accelerate launch tools/train.py ARGS`` on the CPU (gloo for two or more processes)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    if num_processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", free_port()]
    else:
        launcher += ["--num_processes", "1", "--cpu"]
    proc = subprocess.run(launcher + [str(ROOT / "tools" / "train.py"), *args], env=env, capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
