#!/usr/bin/env python
"""The main job on the embedded default: train the tiny DiffDis model, sample a grid, classify zero-shot.

``make demo`` runs this. Everything runs offline on CPU (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

PROMPTS = [
    "a red circle", "a green square", "a blue triangle", "a yellow diamond", "a magenta cross", "a cyan ring",
    "a blue circle", "a yellow square", "a red triangle", "a cyan diamond", "a green cross", "a magenta ring",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/tiny", help="output folder (default: outputs/tiny)")
    parser.add_argument("--skip-train", action="store_true", help="reuse <out>/model from an earlier run")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the training config")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()

    import train as train_tool  # tools/train.py
    import sample as sample_tool  # tools/sample.py
    import zeroshot as zeroshot_tool  # tools/zeroshot.py

    if not args.skip_train:
        code = train_tool.main([f"train.output_dir={out}"] + list(args.overrides))
        if code:
            return code
    trained = time.perf_counter()
    model = out / "model"
    argv_sample = [str(model), "--out", str(out / "samples"), "--steps", "25", "--guidance", "3.0", "--seed", "0", "1"]
    for p in PROMPTS:
        argv_sample += ["--prompt", p]
    code = sample_tool.main(argv_sample)
    if code:
        return code
    code = zeroshot_tool.main([str(model), "--dataset", "embedded", "--task", "all", "--num-samples", "600",
                               "--steps", "10", "--out", str(out / "zeroshot")])
    if code:
        return code
    done = time.perf_counter()
    print(f"\ndemo finished: training {(trained - start) / 60:.1f} min, sampling + zero-shot {(done - trained) / 60:.1f} min")
    print(f"  model:          {model}")
    print(f"  sample grid:    {out / 'samples' / 'grid.png'}")
    print(f"  zero-shot:      {out / 'zeroshot' / 'results.json'}")
    print(f"  training curves: {out / 'curves.png'}  (tensorboard --logdir {out / 'logs'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
