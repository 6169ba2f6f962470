"""Bad local datasets end in a one-line error naming the problem: an imagefolder with an empty metadata file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from diffdis.data import load_image_text_dataset

ROOT = Path(__file__).resolve().parent.parent


def _folder(root: Path, metadata_name: str, metadata_text: str) -> Path:
    """A folder with one image and the given metadata file."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 40, 40)).save(root / "0.png")
    (root / metadata_name).write_text(metadata_text)
    return root


@pytest.mark.parametrize(
    "metadata_name, metadata_text",
    [("metadata.jsonl", ""), ("metadata.jsonl", "\n  \n"), ("metadata.csv", ""), ("metadata.csv", "file_name,text\n")],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_empty_metadata_file_is_a_value_error_naming_it(tmp_path, metadata_name, metadata_text, streaming):
    folder = _folder(tmp_path / "data", metadata_name, metadata_text)
    with pytest.raises(ValueError, match="has no records") as info:
        load_image_text_dataset(str(folder), streaming=streaming)
    assert str(folder / metadata_name) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_an_empty_split_does_not_stop_the_other_split(tmp_path):
    root = tmp_path / "splits"
    _folder(root / "train", "metadata.jsonl", json.dumps({"file_name": "0.png", "text": "a red square"}) + "\n")
    _folder(root / "test", "metadata.jsonl", "")
    train = load_image_text_dataset(str(root), split="train")
    assert len(train) == 1 and train[0]["caption"] == "a red square"
    with pytest.raises(ValueError, match="test/metadata.jsonl' of dataset folder .* has no records"):
        load_image_text_dataset(str(root), split="test")


def test_train_cli_reports_an_empty_metadata_file_in_one_line(tmp_path, tiny_overrides, capsys):
    folder = _folder(tmp_path / "data", "metadata.jsonl", "")
    from diffdis.cli import train as tool

    out = tmp_path / "run"
    rc = tool.main(tiny_overrides + [f"data.name={folder}", f"train.output_dir={out}", "train.max_steps=1", "train.report_to=none"])
    assert rc != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ValueError: metadata file") and str(folder / "metadata.jsonl") in last
    assert not out.exists()  # nothing written
