"""The classification benchmark registry (CLIP_benchmark's sets) and the class-order check against a ClassLabel."""

from __future__ import annotations

import io
import json
import tarfile
from importlib import resources

import datasets
import pytest
from PIL import Image

from diffdis.eval import zeroshot as zs
from diffdis.eval.api import EvaluationError, default_dataset, load_zero_shot_tasks
from diffdis.eval.tasks import check_class_order

from helpers_tiny import save_tiny_zero_shot_model

NUM_CLASSES = {  # the documented sizes of CLIP_benchmark's classification sets
    "imagenet1k": 1000, "cifar10": 10, "cifar100": 100, "stl10": 10, "food101": 101, "pets": 37, "flowers": 102,
    "caltech101": 102, "cars": 196, "fgvc_aircraft": 100, "dtd": 47, "eurosat": 10, "sun397": 397, "gtsrb": 43,
    "resisc45": 45, "mnist": 10, "country211": 211,
}
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_every_benchmark_loads_with_its_number_of_classes():
    assert set(zs.benchmark_names()) == set(NUM_CLASSES)
    for name, count in NUM_CLASSES.items():
        names, templates = zs.load_task(name)
        assert len(names) == count, name
        assert templates and all(t.count("{}") == 1 for t in templates), name
        spec = zs.benchmark_dataset(name)
        assert spec.hub.startswith("clip-benchmark/wds_") and spec.split == "test" and spec.label_column == "cls", name
        assert default_dataset(name) == spec.hub
    assert zs.load_task("cifar10")[0] == CIFAR10
    assert zs.load_task("mnist")[0] == [str(i) for i in range(10)]
    assert zs.benchmark_dataset("shape") is None and default_dataset("shape") == "embedded"


def _saved_dataset(folder, names, labels):
    """A saved dataset (``save_to_disk``) with a ClassLabel of ``names`` and one 8x8 image per label."""
    images = [Image.new("RGB", (8, 8), (20 * label, 0, 0)) for label in labels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)}
                         ).save_to_disk(str(folder))
    return str(folder)


def test_class_names_in_the_dataset_order_are_accepted(tmp_path):
    labels = [0, 3, 9, 3]
    folder = _saved_dataset(tmp_path / "ok", [n.title() for n in CIFAR10], labels)
    images, tasks = load_zero_shot_tasks(folder, "cifar10", resolution=8)
    assert tasks["cifar10"].labels.tolist() == labels and tasks["cifar10"].classnames == CIFAR10
    assert images[[0, 1]].shape == (2, 3, 8, 8)


def test_class_names_in_another_order_are_refused(tmp_path, capsys):
    permuted = CIFAR10[:3] + [CIFAR10[4], CIFAR10[3]] + CIFAR10[5:]  # cat and deer swapped
    folder = _saved_dataset(tmp_path / "permuted", permuted, [0, 1, 2])
    with pytest.raises(EvaluationError, match="class 3 is 'cat' in the class names but 'deer' in the ClassLabel"):
        load_zero_shot_tasks(folder, "cifar10", resolution=8)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CIFAR10) + "\n")  # the same list as a file: refused in the same way
    with pytest.raises(EvaluationError, match="class 3 is 'cat'"):
        load_zero_shot_tasks(folder, "auto", resolution=8, classnames=str(names))
    from diffdis.cli import zeroshot

    model = save_tiny_zero_shot_model(tmp_path / "model")
    assert zeroshot.main([str(model), "--dataset", folder, "--task", "cifar10", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (weight-loading progress bars may precede it)
    assert err.startswith("error: class names out of the dataset's order: class 3 is 'cat'")


def test_class_names_match_the_synonyms_and_camel_case_of_hub_class_labels():
    check_class_order(["tench", "great white shark", "kite (bird of prey)"],
                      ["tench, Tinca tinca", "great white shark, white shark, man-eater", "kite"])
    check_class_order(["annual crop land", "lake or sea"], ["AnnualCrop", "SeaLake"])
    with pytest.raises(EvaluationError, match="class 0 is 'lake or sea'"):
        check_class_order(["lake or sea", "annual crop land"], ["AnnualCrop", "SeaLake"])  # permuted


def test_check_class_order_normalises_case_underscores_and_hyphens():
    check_class_order(["Aquarium Fish", "maple tree", "off-center face"], ["aquarium_fish", "Maple_Tree", "off center face"])
    with pytest.raises(EvaluationError, match="class 1 is 'maple tree' in the class names but 'oak_tree'"):
        check_class_order(["aquarium fish", "maple tree"], ["aquarium_fish", "oak_tree"])
    with pytest.raises(EvaluationError, match="2 class names given but the label column declares 3 classes"):
        check_class_order(["a", "b"], ["a", "b", "c"])


def test_folders_named_by_class_index_keep_their_index(tmp_path):
    """An imagefolder sorts folders 0..11 as strings (0, 1, 10, 11, 2, ...): the folder's number is the class."""
    for cls in range(12):
        (tmp_path / str(cls)).mkdir()
        Image.new("RGB", (8, 8), (cls * 20, 0, 0)).save(tmp_path / str(cls) / "a.png")
    names = tmp_path.parent / f"{tmp_path.name}_names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(12)) + "\n")
    images, tasks = load_zero_shot_tasks(str(tmp_path), "auto", resolution=8, classnames=str(names))
    (task,) = tasks.values()
    reds = images[list(range(12))][:, 0, 0, 0]  # the red channel encodes the folder's number
    order = sorted(range(12), key=lambda i: float(reds[i]))
    assert [task.labels[i].item() for i in order] == list(range(12))


def test_a_folder_of_webdataset_shards_with_a_benchmark_task(tmp_path):
    """A local copy of a clip-benchmark/wds_* set: PNG images and integer ``cls`` in tar shards under test/."""
    (tmp_path / "test").mkdir()
    with tarfile.open(tmp_path / "test" / "0.tar", "w") as tar:
        for i, label in enumerate([7, 2, 0]):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (30 * label, 0, 0)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "classnames.txt").write_text("\n".join(str(i) for i in range(10)) + "\n")
    images, tasks = load_zero_shot_tasks(str(tmp_path), "mnist", resolution=8)
    assert tasks["mnist"].labels.tolist() == [7, 2, 0] and images[[0]].shape == (1, 3, 8, 8)


def test_registry_files_keep_one_format():
    for name in zs.task_names():
        data = json.loads((resources.files("diffdis.eval") / "templates" / f"{name}.json").read_text(encoding="utf-8"))
        assert set(data) <= {"classnames", "templates", "label", "ensemble", "dataset", "source"}, name
