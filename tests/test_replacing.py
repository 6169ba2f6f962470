"""Unusable examples are replaced, not dropped; streams split per process and resume where they stopped."""

from __future__ import annotations

import pytest
import torch
from helpers_data import caption, write_imagefolder, write_shards
from helpers_tiny import tiny_tokenizer

from diffdis.data import ImageTextCollator, load_image_text_dataset
from diffdis.data.replacing import DataError, ExampleStream, ReplacingDataset, StreamPosition


@pytest.fixture
def prepare():
    return ImageTextCollator(tiny_tokenizer(), resolution=8).prepare


def _epoch(stream, epoch: int = 0) -> list[dict]:
    """The examples a stream yields in ``epoch`` (it is endless: stop at the first example of the next one)."""
    out = []
    for example in stream:
        if example["stream_state"][1]["epoch"] > epoch:
            break
        out.append(example)
    return out


def test_replacing_dataset_keeps_every_item_usable_and_draws_are_seeded(tmp_path, prepare):
    folder = write_imagefolder(tmp_path / "f", 32, corrupt=[3, 7])
    raw = load_image_text_dataset(str(folder))
    data = ReplacingDataset(raw, prepare, seed=0)
    items = [data[i] for i in range(len(data))]
    assert all(item["pixel_values"].shape == (3, 8, 8) for item in items)
    assert [i for i, item in enumerate(items) if item["num_replaced"]] == [3, 7]
    assert sum(item["num_replaced"] for item in items) == 2
    assert items[3]["caption_options"] != [caption(3)]  # replaced by another example
    again = ReplacingDataset(raw, prepare, seed=0)[3]
    assert again["caption_options"] == items[3]["caption_options"]  # the same draw on every process and after a resume
    assert torch.equal(again["pixel_values"], items[3]["pixel_values"])


def test_kept_examples_come_back_bit_for_bit_without_preparing_again(tmp_path, prepare):
    folder = write_imagefolder(tmp_path / "f", 16, corrupt=[5])
    raw = load_image_text_dataset(str(folder))
    calls = []

    def counted(example):
        calls.append(1)
        return prepare(example)

    plain = ReplacingDataset(raw, prepare, seed=0)
    kept = ReplacingDataset(raw, counted, seed=0, cache_bytes=2**20)
    first = [kept[i] for i in range(16)]
    prepared = len(calls)
    assert prepared == 17  # 16 examples, one of them replaced after an unreadable image
    for _ in range(2):  # later epochs: nothing decoded again, the same examples as an uncached dataset gives
        again = [kept[i] for i in range(16)]
        assert len(calls) == prepared
        for a, b, c in zip(again, first, (plain[i] for i in range(16))):
            assert a["pixel_values"].dtype == torch.float32 and torch.equal(a["pixel_values"], c["pixel_values"])
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert a["caption_options"] == c["caption_options"] and a["num_replaced"] == c["num_replaced"]
    assert kept.kept[0]["pixel_values"].dtype == torch.uint8  # a quarter of float32's memory
    again[0]["pixel_values"].add_(1.0)  # a caller changing its batch does not change what is kept
    assert torch.equal(kept[0]["pixel_values"], plain[0]["pixel_values"])


def test_cache_stops_at_its_budget_and_keeps_other_pixels_as_they_are(tmp_path, prepare):
    raw = load_image_text_dataset(str(write_imagefolder(tmp_path / "f", 8)))
    one = 3 * 8 * 8 + 512
    small = ReplacingDataset(raw, prepare, cache_bytes=2 * one)
    [small[i] for i in range(8)]
    assert sorted(small.kept) == [0, 1] and small.kept_bytes == 2 * one

    def scaled(example):  # pixels that no uint8 image gives: kept as float32
        out = prepare(example)
        return {**out, "pixel_values": out["pixel_values"] / 3.0}

    odd = ReplacingDataset(raw, scaled, cache_bytes=2**20)
    value = odd[2]["pixel_values"]
    assert odd.kept[2]["pixel_values"].dtype == torch.float32 and torch.equal(odd[2]["pixel_values"], value)


def test_memory_cache_budget_is_all_or_nothing():
    from types import SimpleNamespace

    from diffdis.train.build import memory_cache_bytes

    data = SimpleNamespace(memory_cache_mb=1.0, num_workers=0, resolution=16)
    each = 3 * 16 * 16 + 512
    assert memory_cache_bytes(data, 2**20 // each, True) == 2**20
    assert memory_cache_bytes(data, 2**20 // each + 1, True) == 0  # the whole set does not fit: nothing kept
    assert memory_cache_bytes(data, 10, False) == 0  # random crops or flips: each epoch differs
    assert memory_cache_bytes(SimpleNamespace(memory_cache_mb=0, num_workers=0, resolution=16), 10, True) == 0
    two = SimpleNamespace(memory_cache_mb=1.0, num_workers=2, resolution=16)
    assert memory_cache_bytes(two, 10, True) == 2**19  # each worker keeps its own copy


def test_replacing_dataset_with_nothing_readable_is_one_error(tmp_path, prepare):
    folder = write_imagefolder(tmp_path / "f", 8, corrupt=range(8))
    with pytest.raises(DataError, match="no usable example"):
        ReplacingDataset(load_image_text_dataset(str(folder)), prepare, max_draws=5)[0]


@pytest.mark.parametrize("source", ["shards", "streamed_imagefolder"])
def test_two_streams_see_each_example_once_per_epoch(tmp_path, prepare, source):
    corrupt = [5, 12]
    if source == "shards":
        raw = load_image_text_dataset("webdataset", data_files=write_shards(tmp_path / "s", [8, 8, 8, 8], corrupt))
    else:
        raw = load_image_text_dataset(str(write_imagefolder(tmp_path / "f", 32, corrupt)), streaming=True)
    seen, replaced = [], 0
    for rank in (0, 1):
        examples = _epoch(ExampleStream(raw, prepare, rank=rank, world_size=2, seed=0, shuffle_buffer=6))
        seen += [e["caption_options"][0] for e in examples]
        replaced += sum(e["num_replaced"] for e in examples)
    usable = sorted(caption(i) for i in range(32) if i not in corrupt)
    assert sorted(seen) == usable  # every usable example once, no example on both processes
    assert replaced == len(corrupt)


def test_stream_epochs_reshuffle_and_never_end(tmp_path, prepare):
    raw = load_image_text_dataset("webdataset", data_files=write_shards(tmp_path / "s", [8, 8]))
    stream = ExampleStream(raw, prepare, seed=0, shuffle_buffer=4)
    first, second = _epoch(stream, 0), _epoch(stream, 1)[len(_epoch(stream, 0)):]
    order = lambda examples: [e["caption_options"][0] for e in examples]  # noqa: E731
    assert sorted(order(first)) == sorted(order(second)) == sorted(caption(i) for i in range(16))
    assert order(first) != order(second)


@pytest.mark.parametrize("buffer", [0, 4])
def test_stream_resumes_after_the_last_trained_example(tmp_path, prepare, buffer):
    raw = load_image_text_dataset("webdataset", data_files=write_shards(tmp_path / "s", [8, 8, 8, 8]))
    straight = [e["caption_options"][0] for e in _epoch(ExampleStream(raw, prepare, rank=1, world_size=2, shuffle_buffer=buffer))]
    position = StreamPosition()
    before = []
    for example in ExampleStream(raw, prepare, rank=1, world_size=2, shuffle_buffer=buffer):
        before.append(example["caption_options"][0])
        position.update(example["stream_state"])
        if len(before) == 6:
            break
    position.load_state_dict(position.state_dict())  # as a checkpoint would
    after = [e["caption_options"][0] for e in _epoch(ExampleStream(raw, prepare, rank=1, world_size=2, shuffle_buffer=buffer,
                                                                   start=position.states))]
    assert not set(before) & set(after), "a resumed stream repeated examples"
    if buffer == 0:
        assert before + after == straight  # exactly where it stopped
    else:
        assert set(before + after) <= set(straight)  # examples waiting in the shuffle buffer are not replayed


def test_collator_sums_replacements_and_keeps_the_last_stream_state(tmp_path, prepare):
    raw = load_image_text_dataset("webdataset", data_files=write_shards(tmp_path / "s", [6], corrupt=[1, 2]))
    examples = _epoch(ExampleStream(raw, prepare, shuffle_buffer=0))
    batch = ImageTextCollator(tiny_tokenizer(), resolution=8, defer_choice=True)(examples)
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["num_replaced"] == 2
    assert batch["stream_state"] == examples[-1]["stream_state"]
