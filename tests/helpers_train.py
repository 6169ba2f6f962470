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
