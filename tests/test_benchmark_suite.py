"""tools/evaluate.py MODEL --suite FILE: classification and retrieval tasks from a YAML, one CLIP_benchmark table."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from PIL import Image

from diffdis.cli import evaluate
from diffdis.eval.api import EvaluationError
from diffdis.eval.benchmark_suite import load_suite

from helpers_tiny import save_tiny_zero_shot_model

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SUITE = """
classification:
  - task: cifar10
    dataset: cifar_saved
  - name: colours
    dataset: colour_folders
retrieval:
  - dataset: coco/dataset_coco.json
    split: test
"""


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    """A suite file beside its data: a saved CIFAR-10-like set, class subfolders and a Karpathy-split file."""
    root = tmp_path_factory.mktemp("suite")
    labels = [0, 3, 5, 9, 3, 1]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10)})
    images = [Image.new("RGB", (8, 8), (25 * label, 100, 0)) for label in labels]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)}
                         ).save_to_disk(str(root / "cifar_saved"))
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / "colour_folders" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), rgb).save(root / "colour_folders" / name / f"{i}.png")
    (root / "coco").mkdir()
    entries = []
    for i, (colour, rgb) in enumerate((("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220)))):
        Image.new("RGB", (8, 8), rgb).save(root / "coco" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "split": "test",
                        "sentences": [{"raw": f"a {colour} square {j}"} for j in range(5)]})
    (root / "coco" / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    (root / "suite.yaml").write_text(SUITE)
    return root


def test_suite_writes_one_clip_benchmark_table(suite_dir, tmp_path):
    model = save_tiny_zero_shot_model(tmp_path / "model")
    out = tmp_path / "bench"
    argv = [str(model), "--suite", str(suite_dir / "suite.yaml"), "--out", str(out), "--zs-steps", "1", "--batch-size",
            "4", "--device", "cpu"]
    assert evaluate.main(argv) == 0
    result = json.loads((out / "benchmark.json").read_text())
    assert result["model"] == str(model) and result["settings"]["steps"] == 1 and "--suite" in result["command"]
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    cifar, colours, coco = result["records"]
    for record in (cifar, colours, coco):
        assert set(record) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert record["model"] == str(model)
        assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    assert cifar["dataset"] == "cifar10" and cifar["task"] == "zeroshot_classification" and cifar["num_samples"] == 6
    assert set(cifar["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert colours["dataset"] == "colours" and set(colours["metrics"]) == {"acc1", "mean_per_class_recall"}  # 2 classes
    assert coco["dataset"] == "coco" and coco["task"] == "zeroshot_retrieval" and coco["num_texts"] == 15
    assert set(coco["metrics"]) == {f"{s}_retrieval_recall@{k}" for s in ("image", "text") for k in (1, 5, 10)}
    assert coco["metrics"]["image_retrieval_recall@5"] == 1.0  # three images
    table = (out / "benchmark.md").read_text()
    assert "| dataset | task | n | acc1 | acc5 | mean_per_class_recall | image_retrieval_recall@1 |" in table
    assert "| coco | zeroshot_retrieval | 3 |" in table
    record = json.loads((out / "records" / "cifar10_zeroshot_classification.json").read_text())
    assert record == cifar


@pytest.mark.parametrize("text, message", [
    ("classification:\n  - task: cifar10\n    labels: x\n", "classification entry 1: unknown option 'labels'"),
    ("retrieval:\n  - split: test\n", "retrieval entry 1: 'dataset' is required"),
    ("classification: [\n", "not valid YAML"),
    ("tasks: []\n", "expected a mapping with 'classification' and/or 'retrieval' lists"),
    ("classification: []\n", "not both empty"),
    ("retrieval:\n  - dataset: x.json\n    num_samples: many\n", "num_samples must be a whole number >= 0, got 'many'"),
])
def test_bad_suite_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(EvaluationError, match=message):
        load_suite(path)


def test_suite_command_bad_input(tmp_path, capsys):
    assert evaluate.main([str(tmp_path), "--suite", str(tmp_path / "missing.yaml"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"error: suite file '{tmp_path / 'missing.yaml'}' does not exist"
    (tmp_path / "suite.yaml").write_text("retrieval:\n  - dataset: nowhere/dataset_coco.json\n")
    model = save_tiny_zero_shot_model(tmp_path / "model")
    assert evaluate.main([str(model), "--suite", str(tmp_path / "suite.yaml"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot read nowhere/dataset_coco.json")
