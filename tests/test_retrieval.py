"""Retrieval on caption sets: the COCO / Flickr30k Karpathy-split reader, several captions per image, the metric."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffdis.eval import zeroshot as zs
from diffdis.eval.api import EvaluationError, ZeroShotSettings, load_retrieval_set, retrieval
from diffdis.pipelines.zeroshot_pipeline import load_zero_shot_pipeline

from helpers_tiny import save_tiny_zero_shot_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SPLITS = {"red": "test", "green": "test", "blue": "test", "yellow": "train"}


def _captions(colour: str) -> list:
    return [f"a {colour} square", f"a photo of a {colour} square", f"the {colour} square", f"a large {colour} square",
            f"a drawing of a {colour} square"]


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """A tiny dataset_coco.json: three test images and one train image, five captions each, under val2014/."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    images = []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (12, 10), rgb).save(root / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "imgid": i, "split": SPLITS[colour], "cocoid": i,
                       "sentences": [{"raw": c, "tokens": c.split(), "imgid": i} for c in _captions(colour)]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_zero_shot_model(tmp_path_factory.mktemp("zs_model"))


# ---------------------------------------------------------------------------- the metric
def test_recall_counts_each_caption_once_and_an_image_hit_on_any_of_its_captions():
    images = torch.eye(3)  # (3, 3)
    texts = F.normalize(torch.tensor([[1.0, 0.2, 0], [0.1, 1, 0], [0, 1, 0.3], [0, 0.2, 1], [0, 0, 1], [1, 0, 0.5]]), dim=-1)
    index = torch.tensor([0, 0, 1, 1, 2, 2])  # two captions per image
    for chunk in (1, 4, 1024):
        m = zs.retrieval_metrics(images, texts, index, recall_k=(1, 2), chunk_size=chunk)
        # text -> image (six queries, one positive each): texts 0, 2, 4 rank their image first; 1, 3, 5 second
        assert m["image_retrieval_recall@1"] == pytest.approx(3 / 6)
        assert m["image_retrieval_recall@2"] == pytest.approx(1.0)
        # image -> text: image 0's best text is its caption 0 (hit), image 2's is its caption 4 (hit); image 1's best
        # is caption 1 (image 0's), then its own caption 2: a miss at 1, a hit at 2
        assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
        # image 0 has only one of its two captions (0; then 5 third) in its top 2: still a full hit
        assert m["text_retrieval_recall@2"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- Karpathy-split reader
def test_karpathy_reader_takes_one_split_with_every_caption(coco_file):
    images, captions = load_retrieval_set("test", None, 8, str(coco_file))
    assert len(images) == 3 and captions == [_captions(c) for c in ("red", "green", "blue")]
    pixels = images[[0, 2]]  # (2, 3, 8, 8), decoded on demand
    assert pixels.shape == (2, 3, 8, 8) and pixels[0, 0].mean() > pixels[0, 2].mean()  # red, then blue
    assert len(load_retrieval_set("train", None, 8, str(coco_file))[0]) == 1
    assert len(load_retrieval_set("test", 2, 8, str(coco_file))[0]) == 2


def test_karpathy_reader_errors_name_the_problem(coco_file, tmp_path):
    with pytest.raises(EvaluationError, match="no images in split 'val'; it has: test, train"):
        load_retrieval_set("validation", None, 8, str(coco_file))
    with pytest.raises(EvaluationError, match=r"3 of 3 images of split 'test' are missing, e\.g\. .*val2014"):
        load_retrieval_set("test", None, 8, str(coco_file), images=str(tmp_path))
    with pytest.raises(EvaluationError, match="cannot read"):
        load_retrieval_set("test", None, 8, str(tmp_path / "dataset_flickr30k.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{\"images\": [")
    with pytest.raises(EvaluationError, match="not valid JSON"):
        load_retrieval_set("test", None, 8, str(bad))
    bad.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test", "sentences": [{"tokens": []}]}]}))
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    with pytest.raises(EvaluationError, match="'raw'"):
        load_retrieval_set("test", None, 8, str(bad))


# ---------------------------------------------------------------------------- several captions in an imagefolder
def test_imagefolder_with_a_list_of_captions_per_image(tmp_path):
    rows = []
    for colour, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(tmp_path / f"{colour}.png")
        rows.append(json.dumps({"file_name": f"{colour}.png", "caption": _captions(colour)[:3]}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    images, captions = load_retrieval_set("test", None, 8, str(tmp_path))
    assert len(images) == 4 and captions[1] == _captions("green")[:3]
    with pytest.raises(EvaluationError, match="unknown caption column 'sentences'; the dataset has: image, caption"):
        load_retrieval_set("test", None, 8, str(tmp_path), caption_column="sentences")


# ---------------------------------------------------------------------------- the API and the command
def test_api_retrieval_on_a_karpathy_file(model_dir, coco_file):
    model = load_zero_shot_pipeline(model_dir)
    images, captions = load_retrieval_set("test", None, model.resolution, str(coco_file))
    result = retrieval(model, images, captions, ZeroShotSettings(steps=1, batch_size=2), name="coco")
    res = result["coco"]
    assert res["task"] == "zeroshot_retrieval" and res["num_images"] == 3 and res["num_texts"] == 15
    assert res["metrics"]["image_retrieval_recall@5"] == 1.0  # 3 images: every caption's image is in the top 5
    assert 0 <= res["metrics"]["text_retrieval_recall@1"] <= 1 and res["chance"]["text_retrieval_recall@1"] == pytest.approx(1 / 3)


def test_tool_retrieval_on_a_karpathy_file(model_dir, coco_file, tmp_path, capsys):
    from diffdis.cli import zeroshot

    out = tmp_path / "r"
    argv = [str(model_dir), "--task", "retrieval", "--dataset", str(coco_file), "--split", "test", "--steps", "1",
            "--device", "cpu", "--out", str(out)]
    assert zeroshot.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == str(coco_file) and res["results"]["retrieval"]["num_texts"] == 15
    assert set(res["results"]["retrieval"]["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text")
                                                           for k in (1, 5, 10)}
    assert zeroshot.main(argv[:-2] + ["--images", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: 3 of 3 images")
