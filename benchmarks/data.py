"""Data path speed: ms per batch of the trainer's map-style loader (``ReplacingDataset`` + ``ImageTextCollator``, as
the trainer builds them) with each decoded image kept in memory after its first epoch (``data.memory_cache_mb``),
against decoding every image every epoch, on the same data, batch and shuffled order."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, Tuple

import torch
from torch.utils.data import DataLoader

from .common import CliError
from .timing import time_interleaved

HELP = "the trainer's data loader: images kept in memory after the first epoch vs decoded every epoch"


def summary_keys(args) -> Tuple[str, ...]:
    """The keys printed after a run."""
    return ("kept_ms_per_batch", "decoded_ms_per_batch", "speedup", "first_epoch_s", "kept_mb")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``run.py data``."""
    p.add_argument("--batches", type=int, default=100, help="batches read per timed round (default: 100)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON file (default: benchmark_data.json)")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # the loader runs on the CPU
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)  # train.batch_size=N instead
    p.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value training-config overrides (e.g. data.resolution=32)")


def _loader(dataset, cfg, collate) -> DataLoader:
    order = torch.Generator().manual_seed(0)  # the same shuffled order for both arms
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                      generator=order)


def _read(loader: DataLoader, batches: int) -> int:
    seen = 0
    for seen, batch in enumerate(loader, 1):
        assert batch["pixel_values"].shape[0] == loader.batch_size
        if seen == batches:
            break
    return seen


def run(args, device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    """Prime the kept arm with one whole epoch (timed: ``first_epoch_s``), then time ``--batches`` batches of each
    arm in interleaved rounds. ``speedup`` is decoded / kept ms per batch."""
    from diffdis.config import ConfigError, load_config
    from diffdis.data.replacing import ReplacingDataset
    from diffdis.train.build import load_split, make_collator, memory_cache_bytes

    if args.batches < 1:
        raise CliError("--batches must be at least 1")
    try:
        cfg = load_config(None, list(args.overrides))
    except ConfigError as err:
        raise CliError(str(err)) from None
    train_set = load_split(cfg.data, cfg.data.split, num_samples=cfg.data.num_train_samples)
    collate = make_collator(cfg, None, defer_choice=True)  # as the trainer: captions are drawn and tokenized in the step
    budget = memory_cache_bytes(cfg.data, len(train_set), collate.deterministic)
    if not budget:
        raise CliError(f"the {len(train_set)} examples do not fit data.memory_cache_mb={cfg.data.memory_cache_mb}"
                       " (or the crop is random): nothing would be kept")
    kept = ReplacingDataset(train_set, collate.prepare, seed=cfg.train.seed, cache_bytes=budget)
    decoded = ReplacingDataset(train_set, collate.prepare, seed=cfg.train.seed)
    start = time.perf_counter()
    epoch = _read(_loader(kept, cfg, collate), len(train_set))
    first_epoch_s = time.perf_counter() - start
    batches = min(args.batches, epoch)
    loaders = {"kept": _loader(kept, cfg, collate), "decoded": _loader(decoded, cfg, collate)}
    times = time_interleaved({name: (lambda loader=loader: _read(loader, batches)) for name, loader in loaders.items()},
                             args.repeats, torch.device("cpu"))
    ms = {name: 1e3 * statistics.median(t) / batches for name, t in times.items()}
    return {"kept_ms_per_batch": ms["kept"], "decoded_ms_per_batch": ms["decoded"],
            "speedup": ms["decoded"] / ms["kept"], "first_epoch_s": first_epoch_s, "first_epoch_batches": epoch,
            "kept_mb": kept.kept_bytes / 2**20, "kept_examples": len(kept.kept), "num_examples": len(train_set),
            "batches_per_round": batches, "train_batch": cfg.train.batch_size, "resolution": cfg.data.resolution,
            "data": cfg.data.name, "model": "none (the data loader alone)", "overrides": list(args.overrides), "times_s": times,
            "reference": "the same ReplacingDataset and collator with data.memory_cache_mb=0: every image decoded,"
                         " resized and converted at every read"}
