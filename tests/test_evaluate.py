"""The evaluation command (diffdis.cli.evaluate: one report of FID, adherence, zero-shot, retrieval) and the ablation,
end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from diffdis.cli import evaluate

SMALL = ["--fid-images", "12", "--adherence-per-combo", "1", "--zeroshot-samples", "12", "--retrieval-samples", "8",
         "--steps", "2", "--zs-steps", "2", "--batch-size", "16", "--reference-steps", "20", "--device", "cpu"]




@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIFFDIS_CACHE", str(tmp_path_factory.getbasetemp() / "diffdis_cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-step tiny training run's model folder (with curves.png beside it)."""
    from conftest import TINY_TRAIN_OVERRIDES

    out = tmp_path_factory.mktemp("run")
    from diffdis.cli import train

    assert train.main(TINY_TRAIN_OVERRIDES + [f"train.output_dir={out}", "train.max_steps=2", "train.report_to=none"]) == 0
    return out / "model"


def test_evaluate_writes_report(model_dir, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main([str(model_dir), "--out", str(out)] + SMALL) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["metrics"]
    assert m["fid"] >= 0 and metrics["fid"]["num_fake"] == 12 and metrics["fid"]["steps"] == 2
    for key in ("adherence/shape", "adherence/colour", "adherence/both", "shape/acc1", "colour/acc1",
                "colour_shape/acc1", "retrieval/image_retrieval_recall@1", "retrieval/text_retrieval_recall@5"):
        assert 0.0 <= m[key] <= 1.0, key
    assert metrics["adherence"]["adherence/num_images"] == 36.0
    assert metrics["machine"]["torch"] == torch.__version__ and metrics["machine"]["cpu"]
    report = (out / "report.md").read_text()
    assert "| prompt adherence: shape |" in report and "| zero-shot colour: top-1 |" in report
    assert "chance 0.167" in report and "FID (reference-r16" in report
    for name in ("grid.png", "curves.png", "zeroshot/confusion_shape.png", "zeroshot/results.json"):
        assert (out / name).is_file(), name
    assert "![samples](grid.png)" in report and "![training curves](curves.png)" in report
    assert not (tmp_path / "eval.tmp").exists()
    assert not any(k.startswith(("relation/", "heldout_colour_shape/")) for k in m)  # trained on embedded data


def test_a_model_trained_on_compositional_data_is_scored_on_its_tasks_too(tmp_path):
    from conftest import TINY_TRAIN_OVERRIDES

    from diffdis.cli import train
    from diffdis.eval.compositional import COMPOSITIONAL_TASKS

    run = tmp_path / "run"
    assert train.main(TINY_TRAIN_OVERRIDES + [f"train.output_dir={run}", "train.max_steps=2", "train.report_to=none",
                                              "data.name=compositional", "data.num_train_samples=64"]) == 0
    out = tmp_path / "eval"
    assert evaluate.main([str(run / "model"), "--out", str(out), "--skip", "fid", "adherence", "--compositional-samples", "24"]
                         + SMALL) == 0
    saved = json.loads((out / "metrics.json").read_text())
    m = saved["metrics"]
    for task in ("shape", "colour", "colour_shape", *COMPOSITIONAL_TASKS):
        assert 0.0 <= m[f"{task}/acc1"] <= 1.0, task
    assert 0.0 <= m["relation/pair_acc"] <= 1.0 and m["heldout_colour_shape/num_samples"] == 24
    assert evaluate.main([str(run / "model"), "--out", str(tmp_path / "e2"), "--skip", "fid", "adherence", "compositional"]
                         + SMALL) == 0
    assert "relation/acc1" not in json.loads((tmp_path / "e2" / "metrics.json").read_text())["metrics"]


def test_evaluate_skip_parts(model_dir, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main([str(model_dir), "--out", str(out), "--skip", "fid", "adherence", "retrieval"] + SMALL) == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "fid" not in m and "adherence/shape" not in m and "shape/acc1" in m
    assert not (out / "grid.png").exists()


def test_evaluate_bad_input(model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(tmp_path)], "not a diffdis model folder"),
        ([str(model_dir), "--extractor", "inception"], "--inception-weights"),
        ([str(model_dir), "--extractor", "inception", "--inception-weights", str(tmp_path / "w.pth")], "not found"),
        ([str(model_dir), "--preset", "coco30k"], "--fid-reference"),
        ([str(model_dir), "--fid-reference", str(tmp_path)], "metadata.jsonl"),
        ([str(model_dir), "--ablation", str(tmp_path / "a.json")], "does not exist"),
    ]
    for argv, message in cases:
        assert evaluate.main(argv + ["--out", str(out)] + SMALL) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err, (argv, err)
    assert not out.exists()


def test_fid_reference_imagefolder(model_dir, tmp_path):
    """A user's reference set (imagefolder + metadata.jsonl) instead of the embedded test split."""
    from diffdis.data.embedded import export_imagefolder, make_embedded_dataset

    import datasets

    export_imagefolder(datasets.DatasetDict({"ref": make_embedded_dataset("test", 10)}), tmp_path)
    folder = tmp_path / "ref"
    out = tmp_path / "eval"
    argv = [str(model_dir), "--out", str(out), "--fid-reference", str(folder), "--skip", "adherence", "zeroshot", "retrieval"]
    assert evaluate.main(argv + SMALL) == 0
    fid = json.loads((out / "metrics.json").read_text())["fid"]
    assert fid["num_real"] == 10 and fid["reference"] == "ref-r16"


@pytest.mark.slow
def test_ablation_end_to_end(tmp_path, model_dir):
    from diffdis.cli import ablation
    from conftest import TINY_TRAIN_OVERRIDES

    out = tmp_path / "abl"
    eval_args = " ".join(SMALL + ["--skip", "retrieval"])
    argv = ["--out", str(out), "--seeds", "0", "--eval-args", eval_args] + TINY_TRAIN_OVERRIDES + [
        "train.max_steps=2", "train.report_to=none"]
    assert ablation.main(argv) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert set(result["runs"]) == {"DiffDis (λ=1)", "generation only (λ=0)"}
    for runs in result["runs"].values():
        assert runs[0]["steps"] == 2 and "fid" in runs[0]
    assert any("FID" in row for row in result["table_md"]) and result["summary"]
    report_dir = tmp_path / "eval"
    assert evaluate.main([str(model_dir), "--out", str(report_dir), "--ablation", str(out / "ablation.json"),
                          "--skip", "fid", "adherence", "retrieval"] + SMALL) == 0
    assert "## Ablation" in (report_dir / "report.md").read_text()


def test_preset_sizes():
    from diffdis.eval.api import EvaluationError, EvaluationSizes, preset_sizes

    assert preset_sizes("quick", fid_images=7) == EvaluationSizes(7, 2, 600, 200, 240)
    assert preset_sizes() == EvaluationSizes(1000, 4, 1000, 500, 480)
    assert preset_sizes("full", compositional_samples=0).compositional_samples == 0
    with pytest.raises(EvaluationError, match=">= 0"):
        preset_sizes("full", compositional_samples=-1)
    with pytest.raises(EvaluationError, match=">= 0"):
        preset_sizes("full", retrieval_samples=-1)
