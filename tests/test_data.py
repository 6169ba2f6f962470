"""Tests of diffdis.data: embedded dataset, loading, transforms and the collator."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from diffdis.data import (  # noqa: E402
    COLOUR_RGB,
    COLOURS,
    NUM_PHRASINGS,
    POSITIONS,
    SHAPES,
    SIZES,
    ImageTextCollator,
    all_captions,
    caption_for,
    class_prompt,
    decode_image,
    export_imagefolder,
    load_image_text_dataset,
    make_embedded_dataset,
    make_embedded_dataset_dict,
    pick_caption,
    render_image,
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer trained on every embedded caption."""
    corpus = [
        c for s in SHAPES for k in COLOURS for z in SIZES for p in POSITIONS
        for c in all_captions(s, k, z, p)
    ]
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"])
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", model_max_length=16,
    )


def _raw_images(dataset: datasets.Dataset) -> list[bytes]:
    return [v["bytes"] for v in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def _shape_mask(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).max(axis=-1) > 80.0  # (H, W) bool


# ---------------------------------------------------------------- embedded dataset


def test_embedded_is_deterministic_and_splits_differ() -> None:
    a = make_embedded_dataset("validation", num_samples=40, seed=3)
    b = make_embedded_dataset("validation", num_samples=40, seed=3)
    assert _raw_images(a) == _raw_images(b)
    assert a["caption"] == b["caption"] and a["shape_id"] == b["shape_id"]
    prefix = make_embedded_dataset("validation", num_samples=10, seed=3)
    assert _raw_images(prefix) == _raw_images(a)[:10]
    other_split = make_embedded_dataset("test", num_samples=40, seed=3)
    other_seed = make_embedded_dataset("validation", num_samples=40, seed=4)
    assert set(_raw_images(a)).isdisjoint(_raw_images(other_split))
    assert set(_raw_images(a)).isdisjoint(_raw_images(other_seed))
    with pytest.raises(ValueError, match="split"):
        make_embedded_dataset("nope", num_samples=2)


def test_embedded_columns_match_captions() -> None:
    ds = make_embedded_dataset("train", num_samples=360, resolution=16)
    assert set(ds.column_names) == {
        "image", "caption", "captions", "shape", "colour", "size", "position",
        "shape_id", "colour_id", "size_id", "position_id",
    }
    assert ds[0]["image"].size == (16, 16) and ds[0]["image"].mode == "RGB"
    # one block of 360 samples holds every combination exactly once
    combos = set(zip(ds["shape_id"], ds["colour_id"], ds["size_id"], ds["position_id"]))
    assert len(combos) == len(SHAPES) * len(COLOURS) * len(SIZES) * len(POSITIONS)
    phrasings = set()
    for row in ds.select_columns([c for c in ds.column_names if c != "image"]):
        names = (row["shape"], row["colour"], row["size"], row["position"])
        ids = (row["shape_id"], row["colour_id"], row["size_id"], row["position_id"])
        assert names == tuple(v[i] for v, i in zip((SHAPES, COLOURS, SIZES, POSITIONS), ids))
        assert row["captions"] == all_captions(*names)
        assert row["caption"] in row["captions"]
        phrasings.add(row["captions"].index(row["caption"]))
        for caption in row["captions"]:
            words = caption.replace(",", " ").split()
            assert row["shape"] in words and row["colour"] in words
            assert not {"left", "right", "top", "bottom", "center"} - {row["position"]} & set(words)
            assert not set(SIZES) - {row["size"]} & set(words)
    assert len(phrasings) == NUM_PHRASINGS >= 4


def test_caption_and_class_prompt() -> None:
    assert caption_for("circle", "red", "large", "left", 1) == "a large red circle on the left"
    assert caption_for(0, 0, 0, 2, 0) == "a red circle"
    assert class_prompt("square", "blue") == "a blue square"
    assert class_prompt(colour="green") == "a green shape"
    with pytest.raises(ValueError):
        caption_for("hexagon", "red", "large", "left", 0)


def test_colours_sizes_positions_are_visible() -> None:
    rng = np.random.default_rng(0)
    centroids: dict[str, list[float]] = {p: [] for p in POSITIONS}
    for shape in SHAPES:
        for colour_id, colour in enumerate(COLOURS):
            areas = {}
            for size in SIZES:
                position = POSITIONS[int(rng.integers(len(POSITIONS)))]
                image = render_image(shape, colour, size, position, resolution=16, rng=rng)
                pixels = np.asarray(image, dtype=np.float32)
                mask = _shape_mask(image)
                mean = pixels[mask].mean(axis=0)
                distances = np.linalg.norm(np.asarray(COLOUR_RGB) - mean, axis=1)
                assert int(distances.argmin()) == colour_id, (shape, colour, size, mean)
                assert pixels[~mask].mean() < 30.0  # dark background
                areas[size] = mask.sum()
                ys, xs = np.nonzero(mask)
                centroids[position].append((xs.mean(), ys.mean()))
            assert areas["large"] > 1.4 * areas["small"], (shape, colour, areas)
    mean = {p: np.mean(v, axis=0) for p, v in centroids.items() if v}
    assert mean["left"][0] < mean["center"][0] - 2 < mean["right"][0] - 4
    assert mean["top"][1] < mean["center"][1] - 2 < mean["bottom"][1] - 4


def _coverage(image: Image.Image) -> np.ndarray:
    brightness = np.asarray(image, dtype=np.float32).max(axis=-1)  # (H, W)
    return np.clip((brightness - 20.0) / (np.percentile(brightness, 99) - 20.0), 0.0, 1.0)


def test_shapes_are_distinguishable_at_16px() -> None:
    """1-nearest-neighbour on coverage maps against jittered references recognises every
    shape at both sizes and every position: no two shapes look alike at 16 px."""
    rng = np.random.default_rng(1)
    for size in SIZES:
        for position in ("center", "left"):
            references = np.stack([
                [_coverage(render_image(s, "green", size, position, 16, rng)) for _ in range(16)]
                for s in SHAPES
            ])  # (S, R, H, W)
            for shape_id, shape in enumerate(SHAPES):
                for colour in COLOURS:
                    query = _coverage(render_image(shape, colour, size, position, 16, rng))
                    errors = np.abs(references - query).sum(axis=(2, 3)).min(axis=1)  # (S,)
                    assert int(errors.argmin()) == shape_id, (shape, colour, size, errors)


def test_imagefolder_round_trip(tmp_path) -> None:
    original = make_embedded_dataset_dict(sizes={"train": 6, "validation": 3, "test": 2})
    export_imagefolder(original, tmp_path)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path))
    assert set(loaded) == {"train", "validation", "test"}
    for split in original:
        assert len(loaded[split]) == len(original[split])
        for a, b in zip(original[split], loaded[split]):
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"].convert("RGB")))
            for key in ("caption", "captions", "shape", "colour", "size", "position", "shape_id"):
                assert a[key] == b[key]


# ---------------------------------------------------------------- loading


def _tiny_folder(root, records: list[tuple[str, bytes | None]], caption_key: str = "text") -> str:
    """An imagefolder with one PNG per record (or the given raw bytes) and metadata.jsonl."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "metadata.jsonl"), "w") as meta:
        for i, (caption, raw) in enumerate(records):
            name = f"{i}.png"
            if raw is None:
                Image.new("RGB", (24, 20), (200, 30, 30)).save(os.path.join(root, name))
            else:
                with open(os.path.join(root, name), "wb") as handle:
                    handle.write(raw)
            meta.write(json.dumps({"file_name": name, caption_key: caption}) + "\n")
    return str(root)


def test_missing_column_lists_existing(tmp_path) -> None:
    folder = _tiny_folder(tmp_path / "f", [("a red square", None)] * 2, caption_key="description")
    with pytest.raises(ValueError) as info:
        load_image_text_dataset(folder)
    assert "'text'" in str(info.value) and "description" in str(info.value)
    with pytest.raises(ValueError, match="'photo'.*image"):
        load_image_text_dataset(folder, image_column="photo", caption_column="description")
    ds = load_image_text_dataset(folder, caption_column="description")
    assert {"image", "caption"} <= set(ds.column_names) and ds[0]["caption"] == "a red square"
    assert ds.features["image"].decode is False


def test_embedded_loading_and_collate(tokenizer) -> None:
    ds = load_image_text_dataset("embedded", split="validation", num_samples=8, caption_column="x")
    assert len(ds) == 8 and ds.features["image"].decode is False
    collate = ImageTextCollator(tokenizer, resolution=16)
    torch.manual_seed(0)
    batch = collate(list(ds))
    assert batch["pixel_values"].shape == (8, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["input_ids"].shape == (8, 16) and batch["input_ids"].dtype == torch.long
    assert all(c in row["captions"] for c, row in zip(batch["captions"], ds))
    assert (batch["input_ids"] == tokenizer.unk_token_id).sum() == 0
    torch.manual_seed(0)
    assert collate(list(ds))["captions"] == batch["captions"]  # global torch RNG drives the pick
    streamed = load_image_text_dataset("embedded", "validation", num_samples=4, streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert collate(list(streamed))["pixel_values"].shape == (4, 3, 16, 16)


def test_corrupt_and_empty_skipped(tmp_path, tokenizer, caplog) -> None:
    records = [("a red square", None), ("a red circle", b"not a png"), ("   ", None),
               ("a blue ring", None)]
    ds = load_image_text_dataset(_tiny_folder(tmp_path / "f", records))
    collate = ImageTextCollator(tokenizer, resolution=8)
    with caplog.at_level(logging.WARNING, logger="diffdis.data"):
        batch = collate(list(ds))
    assert batch["captions"] == ["a red square", "a blue ring"]
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert collate.num_skipped == 2
    assert "1 skipped" in caplog.text
    assert collate([ds[1], ds[2]]) is None and collate.num_skipped == 4


def test_webdataset_shards(tmp_path, tokenizer) -> None:
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, caption in enumerate(["a red circle", "a green square", "a blue ring"]):
            buffer = io.BytesIO()
            Image.new("RGB", (20, 20), COLOUR_RGB[i]).save(buffer, format="PNG")
            for ext, payload in (("png", buffer.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = load_image_text_dataset("webdataset", data_files=[str(shard)])
    assert isinstance(ds, datasets.IterableDataset)
    examples = list(ds)
    assert [e["caption"] for e in examples] == ["a red circle", "a green square", "a blue ring"]
    batch = ImageTextCollator(tokenizer, resolution=16)(examples)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert torch.allclose(batch["pixel_values"][0, :, 8, 8],
                          torch.tensor(COLOUR_RGB[0], dtype=torch.float32) / 127.5 - 1, atol=0.02)


# ---------------------------------------------------------------- transforms


def test_decode_image_and_pick_caption() -> None:
    image = Image.new("RGBA", (5, 4), (1, 2, 3, 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert decode_image(image).mode == "RGB"
    assert decode_image({"bytes": buffer.getvalue(), "path": None}).size == (5, 4)
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        noisy, format="PNG"
    )
    assert decode_image(noisy.getvalue()[: len(noisy.getvalue()) // 2]) is None  # truncated file
    assert decode_image(b"garbage") is None and decode_image(None) is None
    assert decode_image({"bytes": None, "path": "/does/not/exist.png"}) is None
    assert pick_caption(" a cat ") == "a cat"
    assert pick_caption("  ") is None and pick_caption(None) is None and pick_caption([]) is None
    assert pick_caption(["", "a dog"]) == "a dog"
    rng = np.random.default_rng(0)
    assert {pick_caption(["x", "y"], rng) for _ in range(50)} == {"x", "y"}


def test_resize_crop_non_square(tokenizer) -> None:
    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 10, 20))  # white strip at the far left is cropped away
    batch = ImageTextCollator(tokenizer, resolution=8)([{"image": wide, "caption": "a red ring"}])
    assert batch["pixel_values"].shape == (1, 3, 8, 8)
    assert batch["pixel_values"].max() < 0.0
