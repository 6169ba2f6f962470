"""tools/demo.py: how it splits training across CPU processes, and its one-line errors."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import demo  # noqa: E402


def test_batch_must_divide_across_processes(capsys):
    assert demo.train_processes(["train.batch_size=63"], 2) == 2
    assert "train.batch_size=63 does not divide across --processes 2" in capsys.readouterr().err


def test_config_typo_is_one_line_error(capsys):
    assert demo.train_processes(["train.batch_sise=64"], 2) == 2
    assert "batch_sise" in capsys.readouterr().err


def test_processes_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--processes", "0", "--out", "unused"])
    assert exit_info.value.code == 2
    assert "--processes must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("cores, cuda, expected", [(1, False, 1), (2, False, 2), (16, False, 2), (16, True, 1)])
def test_default_processes(monkeypatch, cores, cuda, expected):
    import torch

    monkeypatch.setattr(demo.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert demo.default_processes() == expected
