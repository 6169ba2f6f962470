"""benchmarks/run.py quality: three runs trained to their targets and the time ratio, on a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_TRAIN_OVERRIDES

ROOT = Path(__file__).resolve().parent.parent
FAST_EVAL = ["train.eval_zeroshot_samples=8", "train.eval_steps=2", "zeroshot.steps=2", "train.eval_batch_size=16",
             "train.validation_every=0", "train.batch_size=8", "data.num_train_samples=64"]


def _quality(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "quality", "--work-dir", str(tmp_path / "runs"),
                           "--out", str(tmp_path / "q.json"), *argv, *TINY_TRAIN_OVERRIDES, *FAST_EVAL],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_each_arm_stops_at_its_targets_and_the_ratio_is_of_their_seconds(tmp_path):
    proc = _quality(tmp_path, "--eval-every", "2", "--max-steps", "6", "--generation-target", "adherence_colour_pixel=0",
                    "--discrimination-target", "zeroshot_colour=0")  # met at the first evaluation
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "q.json").read_text())
    arms = result["arms"]
    assert {name: (a["method"], a["reached"], a["step"]) for name, a in arms.items()} == {
        "joint": ("diffdis", True, 2), "generation": ("gen_only", True, 2), "discrimination": ("clip", True, 2)}
    assert set(arms["joint"]["targets"]) == {"adherence_colour_pixel", "zeroshot_colour"}
    assert set(arms["generation"]["targets"]) == {"adherence_colour_pixel"}
    for name, arm in arms.items():
        history = [json.loads(line) for line in (tmp_path / "runs" / name / "logs" / "history.jsonl").read_text().splitlines()]
        assert arm["seconds"] == next(r["eval/train_seconds"] for r in history if r["step"] == 2 and "eval/train_seconds" in r) > 0
    assert result["ratio"] == pytest.approx(arms["joint"]["seconds"] / (arms["generation"]["seconds"] + arms["discrimination"]["seconds"]))
    assert "ratio" in proc.stdout and result["command"].startswith("python benchmarks/run.py quality")


@pytest.mark.slow
def test_a_target_not_reached_gives_no_ratio_and_an_existing_folder_is_refused(tmp_path):
    proc = _quality(tmp_path, "--arm", "discrimination", "--eval-every", "2", "--max-steps", "2",
                    "--discrimination-target", "zeroshot_colour=1.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["arms"]["discrimination"]["reached"] is False and result["discrimination_s"] is None
    assert result["ratio"] is None and result["ratio_missing_because"] == "not every arm ran"
    again = _quality(tmp_path, "--arm", "discrimination", "--eval-every", "2", "--max-steps", "2")
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error:") and "exists" in again.stderr


def test_bad_targets_are_one_line_errors(tmp_path, capsys):
    from benchmarks import run

    out = ["--work-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "q.json")]
    assert run.main(["quality", *out, "--generation-target", "adherence_shape"]) == 2
    assert capsys.readouterr().err == "error: target 'adherence_shape' has no value: write adherence_shape=VALUE\n"
    assert run.main(["quality", *out, "--eval-every", "0"]) == 2
    assert "--eval-every must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "q.json").exists()
