"""Training examples that never shrink a batch.

Real image-caption data holds unreadable files and empty captions. Dropping them in the collator
gives one process a batch of 7 while the others have 8, and the next collective (the contrastive
loss's all-gather, DDP's gradient all-reduce) fails or hangs. Here an unusable example is
*replaced* before batching, so every process's batch keeps its size:

- :class:`ReplacingDataset` (map-style): example ``i`` that cannot be used is replaced by another
  index drawn from a generator seeded with ``(seed, i)``: the same on every process and after a
  resume, so replicas and resumed runs stay identical.
- :class:`ExampleStream` (iterable, streaming): an endless stream of this process's part of the
  data (shards split with ``datasets.distributed.split_dataset_by_node``, a seeded shuffle buffer,
  epochs one after another); an unusable example is replaced by the next one of the same shard.
  Every example carries the stream's ``state_dict`` after it, so a checkpoint can record exactly
  where the trained batches stopped (:class:`StreamPosition`).

Each prepared example carries ``num_replaced``: the unusable examples met before it. The trainer sums
them per process and across processes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from diffdis.data.transforms import pixels_to_uint8, uint8_to_pixels

logger = logging.getLogger("diffdis.data")

Prepare = Callable[[Mapping[str, Any]], Optional[Dict[str, Any]]]


class DataError(ValueError):
    """The data holds no usable example where one is needed (every draw unreadable or uncaptioned)."""


class ReplacingDataset(torch.utils.data.Dataset):
    """A map-style dataset of prepared examples in which unusable ones are replaced.

    Args:
        dataset: a map-style dataset of raw examples (``datasets.Dataset``).
        prepare: maps a raw example to a prepared one (``ImageTextCollator.prepare``) or None.
        seed: seeds the replacement draws (with the index of the example replaced).
        max_draws: replacement draws before giving up with :class:`DataError`.
        cache_bytes: keep each prepared example in memory, up to about this many bytes, and return the kept one
            when its index comes again (0: keep none). Only for a ``prepare`` that gives the same output every
            time (``ImageTextCollator.deterministic``): a kept example is returned as it was first prepared,
            replacement count included. Images made by ``to_pixel_values`` are kept as uint8 (a quarter of the
            memory) and given back bit for bit. Each process (and DataLoader worker) keeps its own.
    """

    def __init__(self, dataset, prepare: Prepare, seed: int = 0, max_draws: int = 64, cache_bytes: int = 0) -> None:
        self.dataset = dataset
        self.prepare = prepare
        self.seed = seed
        self.max_draws = max_draws
        self.cache_bytes = int(cache_bytes)
        self.kept: Dict[int, Dict[str, Any]] = {}
        self.kept_bytes = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        kept = self.kept.get(int(index))
        if kept is not None:
            pixels = kept["pixel_values"]
            return {**kept, "pixel_values": uint8_to_pixels(pixels) if pixels.dtype == torch.uint8 else pixels.clone()}
        example = self._prepare(int(index))
        if self.kept_bytes < self.cache_bytes:
            self._keep(int(index), example)
        return example

    def _keep(self, index: int, example: Dict[str, Any]) -> None:
        pixels = example.get("pixel_values")
        if not isinstance(pixels, torch.Tensor):
            return
        small = pixels_to_uint8(pixels) if pixels.dtype == torch.float32 else None
        stored = small if small is not None else pixels.clone()
        self.kept[index] = {**example, "pixel_values": stored}
        self.kept_bytes += stored.numel() * stored.element_size() + 512  # + the dict, captions and counts, roughly

    def _prepare(self, index: int) -> Dict[str, Any]:
        candidate, rng = index, None
        for replaced in range(self.max_draws + 1):
            example = self.prepare(self.dataset[candidate])
            if example is not None:
                example["num_replaced"] = replaced
                return example
            if rng is None:
                rng = np.random.default_rng([self.seed, index])
            candidate = int(rng.integers(len(self.dataset)))
        raise DataError(
            f"no usable example (readable image, non-empty caption) in {self.max_draws + 1} draws from a dataset of "
            f"{len(self.dataset)}: check the image files and the caption column"
        )


class ExampleStream(torch.utils.data.IterableDataset):
    """An endless stream of prepared examples from this process's part of an iterable dataset.

    Args:
        dataset: a ``datasets.IterableDataset`` of raw examples (webdataset shards, a streamed imagefolder).
        prepare: maps a raw example to a prepared one or None (replaced by the next one).
        rank, world_size: this process and the number of processes: shards are split with
            ``split_dataset_by_node`` (whole shards when their number divides ``world_size``, else every
            ``world_size``-th example).
        seed: seed of the shuffle buffer (reshuffled each epoch with ``set_epoch``).
        shuffle_buffer: examples held by the shuffle buffer; 0 keeps the stream's order.
        start: a :class:`StreamPosition` state of a checkpoint: per DataLoader worker, the stream state
            after the last trained example. The stream continues after it (examples waiting in the
            shuffle buffer at the checkpoint are not replayed: ``datasets`` refills the buffer).

    Every prepared example gets ``num_replaced`` and ``stream_state`` = ``(worker id, state)``.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        prepare: Prepare,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        start: Optional[Dict[int, dict]] = None,
    ) -> None:
        super().__init__()
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        if shuffle_buffer > 0:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.dataset = dataset
        self.prepare = prepare
        self.rank = rank
        self.start = dict(start or {})

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        start = self.start.get(worker)
        epoch = int(start["epoch"]) if start else 0
        if start:
            self.dataset.load_state_dict(start)
        replaced, resumed = 0, start is not None
        while True:
            self.dataset.set_epoch(epoch)
            seen = usable = 0
            for raw in self.dataset:
                seen += 1
                example = self.prepare(raw)
                if example is None:
                    replaced += 1
                    continue
                usable += 1
                example["num_replaced"], replaced = replaced, 0
                example["stream_state"] = (worker, self.dataset.state_dict())
                yield example
            if seen == 0 and not resumed:
                return  # a DataLoader worker without a shard of its own
            if usable == 0 and not resumed:
                raise DataError(
                    f"no usable example (readable image, non-empty caption) in the {seen} examples of process {self.rank}'s"
                    " part of the stream: check its shards"
                )
            resumed = False
            epoch += 1


class StreamPosition:
    """Where the trained batches of a stream stopped: per DataLoader worker, the state after its last example.

    ``update`` it with each trained batch's ``stream_state``; its ``state_dict`` is what :class:`ExampleStream`
    takes as ``start``.
    """

    def __init__(self) -> None:
        self.states: Dict[int, dict] = {}

    def update(self, stream_state) -> None:
        if stream_state is not None:
            worker, state = stream_state
            self.states[int(worker)] = state

    def state_dict(self) -> dict:
        return {"states": dict(self.states)}

    def load_state_dict(self, state: dict) -> None:
        self.states = {int(k): v for k, v in state["states"].items()}
