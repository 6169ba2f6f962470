#!/usr/bin/env python
"""Speed benchmarks, each against its reference in the same process, written as JSON ratios.

    python benchmarks/run.py sample                      # tiny default, random weights
    python benchmarks/run.py sample --model outputs/tiny/model --batch-size 16 --steps 25
    python benchmarks/run.py sample --preset sd15 --device cuda --dtype bfloat16 --resolution 512
    python benchmarks/run.py zeroshot --model outputs/tiny/model --classes 10 1000
    python benchmarks/run.py train                        # tiny default: DiffDis step vs diffusers' step
    python benchmarks/run.py train model.patch_size=1 ... # any training-config override
    python benchmarks/run.py quality --eval-every 200    # time to the demo's targets: joint vs gen_only + clip
    python benchmarks/run.py data                         # the trainer's loader: images kept in memory vs decoded
    python benchmarks/run.py methods data.name=compositional  # every method's step: FLOPs and time, ratios to clip

``sample`` (benchmarks/sample.py) times DiffDisPipeline against a vanilla diffusers ``StableDiffusionPipeline``
holding the same weights. ``zeroshot`` (benchmarks/zeroshot.py) gives images/s of DiffDis zero-shot classification
at each class count, joint vs one_way fusion with the image-feature cache, and the diffusion-classifier baseline on
the same model and images. ``train`` (benchmarks/train.py) times one DiffDis training step against the
generation-only step of diffusers' ``train_text_to_image.py``; the ratio is what the second task costs per step.
``quality`` (benchmarks/quality.py) trains the joint model, and gen_only and clip separately, each until its targets
(prompt adherence, zero-shot accuracy) are met; the ratio is the joint model's training time over the two others'.
``data`` (benchmarks/data.py) times the trainer's loader with decoded images kept in memory against decoding them
every epoch. ``methods`` (benchmarks/methods.py) counts and times one training step of every method on the same
batch, as ratios to clip's.

Without ``--model`` the components are built from the preset with random weights: speed does not depend on the
weights. Timings are medians of ``--repeats`` rounds after a warm-up. The JSON also records what each arm ran
(classes, shapes), the settings, the command and the commit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: import the benchmarks as a package, and the library beside them
    if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
        sys.path.pop(0)  # its sample.py / train.py must not shadow modules of the same name
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import data, methods, quality, sample, train, zeroshot  # noqa: E402
from benchmarks.common import DTYPES, CliError, pick_device  # noqa: E402
from diffdis.utils.host import cpu_model, host_record  # noqa: E402

BENCHMARKS = {"sample": sample, "zeroshot": zeroshot, "train": train, "quality": quality, "data": data,
              "methods": methods}


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface: one subcommand per benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in BENCHMARKS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return p


def git_commit() -> Optional[str]:
    """The commit of the checkout the benchmarks run from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


def _check(args) -> None:
    if args.command == "quality":  # its own options, checked by quality.run
        return
    steps = args.steps_per_round if args.command == "train" else args.steps
    if (args.batch_size is not None and args.batch_size < 1) or args.repeats < 1 or steps < 1:
        raise CliError("--batch-size, --repeats and --steps (--steps-per-round) must be at least 1")
    if getattr(args, "model", None) and not Path(args.model).is_dir():
        raise CliError(f"model folder '{args.model}' does not exist")


def main(argv: Optional[list] = None) -> int:
    """Run one benchmark and write its JSON; 2 on bad input (one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out or f"benchmark_{args.command}.json")
    module = BENCHMARKS[args.command]
    try:
        _check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        device, dtype = pick_device(args.device), DTYPES[args.dtype]
        started, commit = time.time(), git_commit()  # the commit before the run: the checkout may move meanwhile
        result = module.run(args, device, dtype)
    except (CliError, ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    result.update(
        benchmark=args.command, model=result.get("model") or getattr(args, "model", None) or (f"{args.preset} preset, random weights" if hasattr(args, "preset")
                                                else "configs/tiny.yaml with the overrides, trained"),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        machine=host_record(device),
        dtype=args.dtype, torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
        batch_size=result.get("train_batch", args.batch_size), repeats=args.repeats, wall_s=time.time() - started,
        command=shlex.join(["python", "benchmarks/run.py", *argv]), commit=commit,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    for k in module.summary_keys(args):
        print(f"{k:>32}: " + (f"{result[k]:.4g}" if result[k] is not None else "-"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
