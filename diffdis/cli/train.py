"""Train a DiffDis model: ``diffdis-train [--config F] [key=value ...]``.

Multi-process: ``accelerate launch -m diffdis.cli.train ...`` (or ``accelerate launch tools/train.py ...``
from a checkout). With no arguments it trains the tiny embedded default (the shipped ``tiny`` config) on the CPU.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from diffdis.config import ConfigError, list_configs, load_config


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train one UNet for text-to-image generation and zero-shot classification (DiffDis).",
        epilog="Any config key can be overridden as key=value, e.g. train.max_steps=200 loss.lambda_ita=0 "
        "model.fusion=one_way. Multi-process: accelerate launch --multi_gpu --num_processes 2 -m diffdis.cli.train",
    )
    parser.add_argument("--config", default=None, help=f"YAML file or shipped config name {list_configs()} (default: tiny)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return parser.parse_args(argv)


def next_commands(cfg, model_dir: Path) -> List[str]:
    """What to run on a trained model, from the run's own data: sampling its validation prompts (or captions),
    zero-shot on its configured labelled dataset (or the procedural tasks), and the full report on procedural data."""
    from diffdis.config import PROCEDURAL_DATA, validation_prompts
    from diffdis.train.evaluation import validation_captions

    lines, z = [], cfg.train.eval_zeroshot
    if (model_dir / "prior_index.json").is_file():  # a prior: it generates CLIP image embeddings, nothing to score
        return [f"python tools/train.py method=rleg model.rleg.prior={model_dir} ...",
                "diffdis.pipelines.prior_pipeline.generate_image_embeddings(folder, captions, torch.Generator())"]
    if (model_dir / "model_index.json").is_file():  # the method generates
        prompts = validation_prompts(cfg)
        if prompts is None and cfg.data.name in PROCEDURAL_DATA:
            prompts = ["a red circle", "a large blue square on the left"]
        if prompts is None:
            try:
                prompts = validation_captions(cfg, 2)
            except (ConfigError, ValueError, OSError):
                prompts = ["<a caption like those of your data>"]
        lines.append(f"python tools/sample.py {model_dir} " + " ".join(f"--prompt {shlex.quote(p)}" for p in prompts[:2]))
    if (model_dir / "zeroshot_index.json").is_file():
        if z.dataset:
            lines.append(f"python tools/zeroshot.py {model_dir} --dataset {shlex.quote(z.dataset)} --task {z.task}")
        elif cfg.data.name == "compositional":
            lines.append(f"python tools/zeroshot.py {model_dir} --dataset compositional --task relation")
        elif cfg.data.name == "embedded":
            lines.append(f"python tools/zeroshot.py {model_dir} --dataset embedded --task shape")
        else:
            lines.append(f"python tools/zeroshot.py {model_dir} --dataset <labelled folder or hub id> --task auto")
    if cfg.data.name in PROCEDURAL_DATA:
        lines.append(f"python tools/evaluate.py {model_dir}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train; returns 0, 2 for a bad config, 1 when the data or weights fail (one line on stderr)."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from accelerate import PartialState

    from diffdis.train import train

    try:
        model_dir = train(cfg)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else err}", file=sys.stderr)
        return 1
    if not PartialState().is_main_process:  # one message per run, not per process
        return 0
    print(f"\nmodel saved to {model_dir}")
    print("next:")
    for line in next_commands(cfg, Path(model_dir)):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
