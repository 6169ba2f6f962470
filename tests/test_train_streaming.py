"""Two processes train on streamed webdataset shards of unequal length with gradient accumulation."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers_tiny import free_port

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "tools" / "train.py")


def _write_shard(path: Path, examples) -> None:
    """A webdataset shard: one ``<key>.jpg`` and ``<key>.txt`` per example."""
    with tarfile.open(path, "w") as tar:
        for key, (image, caption) in examples:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG")
            for ext, payload in (("jpg", buffer.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Two shards of 24 and 8 embedded images: with 2 processes, one runs out of data long before the other."""
    from diffdis.data import make_embedded_dataset

    data = make_embedded_dataset("train", 32)
    root = tmp_path_factory.mktemp("shards")
    pairs = [(i, (data[i]["image"], data[i]["caption"])) for i in range(32)]
    _write_shard(root / "shard-0.tar", pairs[:24])
    _write_shard(root / "shard-1.tar", pairs[24:])
    return [str(root / "shard-0.tar"), str(root / "shard-1.tar")]


@pytest.mark.slow
def test_two_processes_on_uneven_webdataset_shards_stay_in_step(tmp_path, tiny_overrides, uneven_shards):
    # Before: process 0 dispatched every batch and could not send the caption strings (TypeError); with
    # per-process reading, syncing gradients at each process's own end of data left the processes out of step (a hang).
    out = tmp_path / "wds"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()]
    overrides = tiny_overrides + [
        "data.name=webdataset", f"data.data_files=[{','.join(uneven_shards)}]", "data.validation_split=null",
        "train.gradient_accumulation_steps=2", "train.max_steps=5", "train.checkpointing_steps=2",
        f"train.output_dir={out}", "train.report_to=none",
    ]
    proc = subprocess.run(launcher + [TRAIN] + overrides, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 5
    first, second = summary["replica_param_checksums"]
    assert first == second
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
