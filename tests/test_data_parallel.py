"""Two training processes (gloo, CPU) on real-looking data: corrupt files, mostly corrupt shards, streaming and
its resume. Every run must finish with identical replicas, or stop with one error on every process."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers_data import write_imagefolder, write_shards
from helpers_train import accelerate
from safetensors.torch import load_file

QUICK = ["data.num_train_samples=null", "data.validation_split=null", "train.checkpointing_steps=0", "train.log_every=1", "train.lr_warmup_steps=1"]


def _summary(out) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def _weights(out) -> dict:
    return load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_one_corrupt_image_among_256(tmp_path, tiny_overrides):
    folder = write_imagefolder(tmp_path / "data", 256, corrupt=[100])
    out = tmp_path / "run"
    # 256 images / (2 processes x 8) = 16 steps: one epoch, which meets the corrupt file exactly once
    accelerate(tiny_overrides + QUICK + [f"data.name={folder}", f"train.output_dir={out}", "train.batch_size=8",
                                           "train.max_steps=16"], num_processes=2)
    summary = _summary(out)
    assert summary["global_step"] == 16
    assert summary["replica_param_checksums"][0] == summary["replica_param_checksums"][1]
    assert summary["num_skipped_examples"] == 1 and sorted(summary["num_skipped_examples_per_process"]) == [0, 1]
    logged = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert [r["train/replaced_examples"] for r in logged if "train/replaced_examples" in r][-1] == 1


@pytest.mark.slow
def test_streamed_shards_one_mostly_corrupt(tmp_path, tiny_overrides):
    # process 0 streams shards 0 and 2, process 1 shards 1 and 3; 12 of shard 3's 16 examples are unreadable
    shards = write_shards(tmp_path / "shards", [16, 16, 16, 16], corrupt=range(48, 60))
    out = tmp_path / "run"
    # 5 steps of 4: process 1 reads shard 1 and then all of shard 3 (its 4 usable examples are the last ones)
    accelerate(tiny_overrides + QUICK + ["data.name=webdataset", f"data.data_files=[{','.join(shards)}]", "data.streaming=true",
                                           "data.shuffle_buffer=0", f"train.output_dir={out}", "train.max_steps=5"], num_processes=2)
    summary = _summary(out)
    assert summary["global_step"] == 5
    assert summary["replica_param_checksums"][0] == summary["replica_param_checksums"][1]
    assert summary["num_skipped_examples_per_process"] == [0, 12]


@pytest.mark.slow
def test_streamed_run_resumes_where_it_stopped(tmp_path, tiny_overrides):
    shards = write_shards(tmp_path / "shards", [12, 12, 12, 12])
    common = tiny_overrides + QUICK + ["data.name=webdataset", f"data.data_files=[{','.join(shards)}]", "data.streaming=true",
                                       "data.shuffle_buffer=0", "train.max_steps=6", "train.checkpointing_steps=3",
                                       "train.checkpoints_total_limit=5"]
    straight = tmp_path / "straight"
    accelerate(common + [f"train.output_dir={straight}"], num_processes=2)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint-3", "tokenizer"):
        shutil.copytree(straight / name, resumed / name)
    proc = accelerate(common + [f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest"], num_processes=2)
    assert "resumed from" in proc.stderr + proc.stdout
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed stream did not continue where the checkpoint stopped"
    assert _summary(resumed)["replica_param_checksums"] == _summary(straight)["replica_param_checksums"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["imagefolder", "one_process_all_corrupt"])
def test_nothing_readable_stops_every_process_with_one_error(tmp_path, tiny_overrides, layout):
    if layout == "imagefolder":
        data = [f"data.name={write_imagefolder(tmp_path / 'data', 32, corrupt=range(32))}"]
    else:  # process 1's shards (1 and 3) are all unreadable; process 0's are fine
        shards = write_shards(tmp_path / "shards", [8, 8, 8, 8], corrupt=[*range(8, 16), *range(24, 32)])
        data = ["data.name=webdataset", f"data.data_files=[{','.join(shards)}]", "data.streaming=true"]
    out = tmp_path / "run"
    proc = accelerate(tiny_overrides + QUICK + data + [f"train.output_dir={out}", "train.max_steps=2"], num_processes=2, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: DataError: ") == 2, proc.stderr[-3000:]  # one line from each process
    assert "no usable example" in proc.stderr
    assert "diffdis/" not in proc.stderr  # no traceback from the training processes (accelerate's launcher prints its own)
    assert not out.exists()
