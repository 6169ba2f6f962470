"""The main job on the embedded default: train the tiny DiffDis model, sample a grid, evaluate it.

``make demo`` runs this. Everything runs offline on CPU, in 12 to 17 minutes on 2 cores: training gets a
14-minute budget (``--train-minutes``; on a slow CPU fewer than the configured 4000 steps fit, and the
run is shortened to what fits with its LR schedule rescaled; every 400 steps it logs prompt adherence,
zero-shot accuracy and a sample grid), then a sample grid, then
``diffdis-evaluate --quick``: FID, prompt adherence, zero-shot accuracy on every embedded task (next to
chance) and retrieval, in one report. The steps run in this process (``diffdis.cli.train``, ``.sample``,
``.evaluate``); only training across several CPU processes runs as a child (``accelerate launch -m
diffdis.cli.train``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from diffdis.cli import child_env

PROMPTS = [
    "a red circle", "a green square", "a blue triangle", "a yellow diamond", "a magenta cross", "a cyan ring",
    "a blue circle", "a yellow square", "a red triangle", "a cyan diamond", "a green cross", "a magenta ring",
]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_processes(overrides: List[str], processes: int) -> int:
    """Run ``diffdis.cli.train`` under ``accelerate launch`` with the batch split across ``processes`` CPU processes.

    The config's ``train.batch_size`` is per process, so the global batch stays what the config says:
    it must divide by ``processes``. Each process gets an equal share of the cores.
    """
    from diffdis.config import ConfigError, load_config

    try:
        batch = load_config(None, overrides).train.batch_size
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if batch % processes:
        print(f"error: train.batch_size={batch} does not divide across --processes {processes}", file=sys.stderr)
        return 2
    threads = max(1, (os.cpu_count() or processes) // processes)
    env = child_env(OMP_NUM_THREADS=str(threads))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port()]
    print(f"training in {processes} processes x {threads} thread(s), {batch // processes} images each per step (global batch {batch})")
    command = launcher + ["-m", "diffdis.cli.train"] + overrides + [f"train.batch_size={batch // processes}"]
    return subprocess.run(command, env=env).returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train, sample, evaluate; returns the first failing step's exit status, else 0."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/tiny", help="output folder (default: outputs/tiny)")
    parser.add_argument("--skip-train", action="store_true", help="reuse <out>/model from an earlier run")
    parser.add_argument("--train-minutes", type=float, default=14.0,
                        help="wall-clock budget of the training loop (default: 14; 0: no budget, all max_steps)")
    parser.add_argument("--processes", type=int, default=1,
                        help="CPU training processes sharing the batch, each with an equal share of the cores (default: 1;"
                        " 2 single-thread processes measured 0.96-1.17x the steps/s of one 2-thread process here)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the training config")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    out = Path(args.out)
    start = time.perf_counter()

    from diffdis.cli import evaluate, sample, train  # the steps, run in this process

    if not args.skip_train:
        budget = [] if any(o.startswith("train.max_minutes=") for o in args.overrides) or not args.train_minutes else [
            f"train.max_minutes={args.train_minutes}"]
        extra = [] if any(o.startswith("train.eval_every=") for o in args.overrides) else ["train.eval_every=400"]
        overrides = [f"train.output_dir={out}"] + budget + extra + list(args.overrides)
        code = train_processes(overrides, args.processes) if args.processes > 1 else train.main(overrides)
        if code:
            return code
    trained = time.perf_counter()
    model = out / "model"
    argv_sample = [str(model), "--out", str(out / "samples"), "--steps", "25", "--guidance", "5.0", "--seed", "0", "1"]
    for p in PROMPTS:
        argv_sample += ["--prompt", p]
    code = sample.main(argv_sample)
    if code:
        return code
    print()
    code = evaluate.main([str(model), "--quick", "--out", str(out / "eval")])
    if code:
        return code
    done = time.perf_counter()
    print(f"\ndemo finished: training {(trained - start) / 60:.1f} min, sampling + evaluation {(done - trained) / 60:.1f} min")
    print(f"  model:           {model}")
    print(f"  sample grid:     {out / 'samples' / 'grid.png'}")
    print(f"  report:          {out / 'eval' / 'report.md'}  (metrics.json beside it)")
    print(f"  training curves: {out / 'curves.png'}  (tensorboard --logdir {out / 'logs'})")
    print("next:")
    print(f"  python tools/sample.py {model} --prompt 'a cyan triangle at the top' --seed 0 1 2 3")
    print(f"  python tools/zeroshot.py {model} --dataset embedded --task retrieval")
    print(f"  python tools/evaluate.py {model}            # the full-size evaluation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
