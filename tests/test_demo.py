"""The demo (diffdis.cli.demo, tools/demo.py): how it splits training across CPU processes, and its one-line errors."""

import pytest

from diffdis.cli import demo


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
