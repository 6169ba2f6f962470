"""Encode a training set once with the pretrained VAE: a latent cache for data.cache_dir.

    diffdis-cache --config sd15 model.pretrained=/path/to/sd15 data.name=/path/to/imagefolder \\
        --out /path/to/cache
    accelerate launch --num_processes 8 -m diffdis.cli.cache --config sd15 ... --out /shared/cache   # one shard per rank

The config's data section (name, split, columns, resolution, center_crop, random_flip) chooses and crops the
images exactly as training would. Each usable image is encoded once; the cache stores the mean and std of its
latent distribution (a fresh latent is still drawn at every step), its caption(s) and its source index, plus
latent_cache.json, which records the VAE (config and weights hashes, dtype, scaling factor) and the data
settings, so that a run pointed at the cache (data.cache_dir=<out>) can refuse one built with other settings.
Unreadable images and empty captions are skipped and counted. Nothing appears at --out until the cache is complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from diffdis.config import ConfigError, list_configs, load_config


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the cache builder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15", help=f"YAML file or shipped config name {list_configs()} (default: sd15)")
    p.add_argument("--out", required=True, help="cache folder to create (must not exist unless --overwrite)")
    p.add_argument("--batch-size", type=int, default=None, help="images per VAE call (default: train.batch_size)")
    p.add_argument("--num-workers", type=int, default=None, help="image-decoding workers (default: data.num_workers)")
    p.add_argument("--device", default=None, help="encoding device (default: the accelerator's: cuda when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.pretrained=... data.name=...")
    return p


def _build(args: argparse.Namespace) -> tuple[Path, bool]:
    """Load the config, data and VAE and build the cache; returns its folder and whether this is the main process."""
    from diffdis.data.cache import build_latent_cache, data_source
    from diffdis.data.transforms import ImageTextCollator
    from diffdis.models.components import load_vae
    from diffdis.train.build import load_split
    from diffdis.utils.distributed import new_accelerator

    cfg = load_config(args.config, args.overrides)
    if not (cfg.model.use_vae and cfg.model.pretrained):
        raise ConfigError("a latent cache needs model.use_vae=true and model.pretrained=<SD folder or hub id>")
    accelerator = new_accelerator(cpu=not torch.cuda.is_available())  # cpu=True: several CPU ranks use gloo
    device = torch.device(args.device) if args.device else accelerator.device
    d = cfg.data
    dataset = load_split(d, d.split, streaming=False)
    vae = load_vae(cfg.model.pretrained, cfg.model.revision).to(device)
    collator = ImageTextCollator(None, d.resolution, d.center_crop, d.random_flip, defer_choice=True)
    out = build_latent_cache(
        dataset, collator, vae, args.out,
        batch_size=args.batch_size or cfg.train.batch_size,
        device=device,
        accelerator=accelerator,
        source=data_source(d),
        num_workers=d.num_workers if args.num_workers is None else args.num_workers,
        overwrite=args.overwrite,
        progress=True,
    )
    return out, accelerator.is_main_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the cache; a failure is one line on stderr and exit status 1 (2 for a bad config)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # one bar: the encoding one
    try:
        out, main_process = _build(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else err}", file=sys.stderr)
        return 1
    if not main_process:
        return 0
    from diffdis.data.cache import read_manifest

    manifest = read_manifest(out)
    print(f"latent cache: {manifest['num_examples']} examples, {manifest['num_skipped']} skipped (unreadable image or empty caption) -> {out}")
    print(f"train with: data.cache_dir={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
