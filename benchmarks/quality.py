"""Time to quality: the joint model against two separate models trained to the same targets.

Three training runs on the same data and machine, one after the other, each evaluated every ``--eval-every`` steps
and stopped by ``train.stop_at`` at the first evaluation that meets its targets:

* ``joint``: ``method=diffdis``, to the generation targets (prompt adherence) and the discrimination targets
  (zero-shot top-1 on the embedded tasks) at once;
* ``generation``: ``method=gen_only`` (a diffusers ``UNet2DConditionModel`` with the text tower, the diffusion loss
  alone), to the generation targets;
* ``discrimination``: ``method=clip`` (a small CLIP), to the discrimination targets.

Each run's time is its training loop's seconds up to that evaluation, without the evaluations themselves
(``eval/train_seconds`` in its history). ``ratio = joint / (generation + discrimination)``: below 1, one joint model
reaches both targets sooner than the two separate models together.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .common import CliError

HELP = "time for the joint model to reach adherence and zero-shot targets, against gen_only + clip trained separately"
GENERATION = {"adherence_shape": 1.0, "adherence_colour": 1.0}
DISCRIMINATION = {"zeroshot_shape": 1.0, "zeroshot_colour": 1.0}
ARMS = {"joint": ("diffdis", ("generation", "discrimination")), "generation": ("gen_only", ("generation",)),
        "discrimination": ("clip", ("discrimination",))}


def summary_keys(args) -> Tuple[str, ...]:
    """The keys printed after a run."""
    return ("ratio", "joint_s", "generation_s", "discrimination_s")


def _target(text: str) -> Tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        return name, float(value) if sep else float("nan")
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=VALUE") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``run.py quality``."""
    p.add_argument("--out", default=None, help="JSON file (default: benchmark_quality.json)")
    p.add_argument("--work-dir", default="outputs/quality", help="the three runs' folders (default: outputs/quality)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between evaluations (default: 200)")
    p.add_argument("--max-steps", type=int, default=6000, help="the most steps any run may take (default: 6000)")
    p.add_argument("--generation-target", type=_target, action="append", default=None, metavar="NAME=VALUE",
                   help=f"a generation target (repeat; default: {' '.join(f'{k}={v}' for k, v in GENERATION.items())})")
    p.add_argument("--discrimination-target", type=_target, action="append", default=None, metavar="NAME=VALUE",
                   help=f"a discrimination target (repeat; default: {' '.join(f'{k}={v}' for k, v in DISCRIMINATION.items())})")
    p.add_argument("--arm", action="append", choices=tuple(ARMS), default=None,
                   help="run only these arms (repeat; default: all three)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: the environment's)")
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)  # the runs pick their own device
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)  # train.batch_size=N instead
    p.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value training overrides for every arm (e.g. train.batch_size=64)")


def _history_seconds(history: Path, step: int) -> Optional[float]:
    """``eval/train_seconds`` of the evaluation at ``step`` in a run's ``logs/history.jsonl``."""
    for line in history.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("step") == step and "eval/train_seconds" in row:
            return row["eval/train_seconds"]
    return None


def train_to_target(name: str, method: str, targets: Dict[str, float], args, folder: Path) -> dict:
    """Train one arm until its targets are met (or ``--max-steps``); its steps, training seconds and last figures."""
    stop_at = "{" + ", ".join(f"{k}: {v}" for k, v in targets.items()) + "}"
    command = [sys.executable, "-m", "diffdis.cli.train", f"method={method}", *args.overrides,
               f"train.output_dir={folder}", f"train.max_steps={args.max_steps}", "train.max_minutes=null",
               f"train.eval_every={args.eval_every}", f"train.stop_at={stop_at}", "train.checkpointing_steps=0"]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    print(f"{name}: {shlex.join(command[1:])}", flush=True)
    with open(folder.parent / f"{name}.log", "w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise CliError(f"the {name} run failed (exit status {code}); its output is in {folder.parent / f'{name}.log'}")
    summary = json.loads((folder / "train_summary.json").read_text())
    step = summary["stopped_at_target_step"]
    rows = [json.loads(line) for line in (folder / "logs" / "history.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if any(f"eval/{k}" in r for k in targets)][-1]
    return {
        "method": method, "targets": targets, "reached": step is not None, "step": step if step is not None else summary["global_step"],
        "seconds": _history_seconds(folder / "logs" / "history.jsonl", step) if step is not None else None,
        "ms_per_step": summary["ms_per_step"], "last_figures": {k: last.get(f"eval/{k}") for k in targets},
        "trainable_parameters": summary["trainable_parameters"], "command": shlex.join(["python", *command[1:]]),
    }


def run(args, device=None, dtype=None) -> dict:
    """Train the arms to their targets; their seconds and the ratio joint / (generation + discrimination)."""
    if args.eval_every < 1 or args.max_steps < args.eval_every:
        raise CliError("--eval-every must be at least 1 and --max-steps at least --eval-every")
    groups = {"generation": dict(args.generation_target or GENERATION.items()),
              "discrimination": dict(args.discrimination_target or DISCRIMINATION.items())}
    for group in groups.values():
        for k, v in group.items():
            if v != v:  # NaN: no "=VALUE"
                raise CliError(f"target '{k}' has no value: write {k}=VALUE")
    work = Path(args.work_dir)
    arms = args.arm or list(ARMS)
    results: Dict[str, dict] = {}
    for name in arms:
        method, parts = ARMS[name]
        folder = work / name
        if folder.exists():
            raise CliError(f"{folder} exists: remove it or give another --work-dir")
        folder.parent.mkdir(parents=True, exist_ok=True)
        results[name] = train_to_target(name, method, {k: v for g in parts for k, v in groups[g].items()}, args, folder)
        print(f"{name}: {'reached' if results[name]['reached'] else 'NOT reached'} at step {results[name]['step']}"
              f" ({results[name]['seconds'] or float('nan'):.0f} s of training)", flush=True)
    seconds = {name: r["seconds"] for name, r in results.items()}
    ratio, why = None, None
    if set(seconds) != set(ARMS):
        why = "not every arm ran"
    elif any(s is None for s in seconds.values()):
        why = "an arm did not reach its targets within --max-steps: " + ", ".join(k for k, s in seconds.items() if s is None)
    else:
        ratio = seconds["joint"] / (seconds["generation"] + seconds["discrimination"])
    return {"ratio": ratio, "ratio_missing_because": why, "arms": results, **{f"{name}_s": seconds.get(name) for name in ARMS},
            "targets": groups, "eval_every": args.eval_every, "max_steps": args.max_steps,
            "overrides": list(args.overrides), "work_dir": str(work),
            "measures": "seconds of each training loop up to the first evaluation meeting its targets, evaluations excluded"}
