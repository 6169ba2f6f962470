"""Running tools/train.py as a user does: under ``accelerate launch`` (1 or 2 CPU processes) or plain, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from helpers_tiny import free_port

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "tools" / "train.py")


def train_env() -> Dict[str, str]:
    """The environment of a training subprocess: offline hub, the repo importable, every device visible."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def accelerate(args: List[str], num_processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch tools/train.py args``; with ``check``, a failure raises with the end of both outputs."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", free_port()]
    else:
        launcher += ["--num_processes", "1", "--cpu"]
    proc = subprocess.run(launcher + [TRAIN] + args, env=train_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_two_processes_resume_and_evaluate(out: Path, args: List[str], module: str, pipeline_class: str, method: str,
                                            work: Path, monkeypatch) -> None:
    """Train a contrastive pixel method (``clip``, ``oner``) for 2 steps in two processes, resume it to 4, and check
    the replicas, the checkpoint folder ``module``, the logged ITC losses, the saved zero-shot index and that
    tools/zeroshot.py and tools/evaluate.py score it on what it trains (no FID)."""
    import json

    from diffdis.cli import evaluate, zeroshot

    args = args + [f"train.output_dir={out}", "train.report_to=none", "train.checkpointing_steps=2",
                   "train.validation_every=2"]
    accelerate(args + ["train.max_steps=2"], num_processes=2)
    accelerate(args + ["train.max_steps=4", "train.resume_from_checkpoint=latest"], num_processes=2)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["replica_param_checksums"][0] == summary["replica_param_checksums"][1]
    assert (out / "checkpoint-2" / module / "config.json").is_file()
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert any("train/loss_itc" in r for r in rows) and any("val/loss_itc" in r for r in rows)
    index = json.loads((out / "model" / "zeroshot_index.json").read_text())
    assert index["_class_name"] == pipeline_class and index["method"] == method and not index["generates"]
    assert zeroshot.main([str(out / "model"), "--task", "all", "--num-samples", "8", "--device", "cpu",
                          "--out", str(work / "zs")]) == 0
    results = json.loads((work / "zs" / "results.json").read_text())["results"]
    assert set(results) == {"shape", "colour", "colour_shape"}
    monkeypatch.setenv("DIFFDIS_CACHE", str(work / "cache"))
    assert evaluate.main([str(out / "model"), "--out", str(work / "eval"), "--zeroshot-samples", "8",
                          "--retrieval-samples", "8", "--batch-size", "8", "--device", "cpu"]) == 0
    metrics = json.loads((work / "eval" / "metrics.json").read_text())["metrics"]
    assert "shape/acc1" in metrics and "retrieval/image_retrieval_recall@1" in metrics and "fid" not in metrics
