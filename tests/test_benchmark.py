"""tools/benchmark.py: both subcommands write their JSON with the ratios; bad input is a one-line error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import benchmark  # noqa: E402  (tools/benchmark.py)


def test_benchmark_sample_writes_ratio(tmp_path):
    out = tmp_path / "s.json"
    assert benchmark.main(["sample", "--steps", "2", "--repeats", "1", "--batch-size", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ratio"] == pytest.approx(result["ours_s"] / result["vanilla_s"])
    # the default folds 2x2 patches: its 16x16 images are 8x8 latents, which the stand-in VAE (factor 1) is called at
    assert result["image_size"] == 16 and result["resolution"] == 8
    assert result["num_prompts"] == 2 and result["steps"] == 2
    assert "stand-in" in result["vae"] and result["unet_generation_params"] > 1e6


def test_benchmark_zeroshot_writes_rates(tmp_path):
    out = tmp_path / "z.json"
    args = ["zeroshot", "--steps", "2", "--repeats", "1", "--batch-size", "2", "--classes", "10", "50",
            "--dc-timesteps", "2", "--dc-images", "1", "--out", str(out)]
    assert benchmark.main(args) == 0
    result = json.loads(out.read_text())
    for key in ("diffdis_10_classes_img_s", "diffdis_50_classes_img_s", "diffusion_classifier_img_s", "joint_img_s",
                "one_way_cached_img_s"):
        assert result[key] > 0
    assert result["class_count_ratio"] == pytest.approx(
        result["diffdis_10_classes_img_s"] / result["diffdis_50_classes_img_s"])


def test_benchmark_bad_input(tmp_path, capsys):
    assert benchmark.main(["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert benchmark.main(["zeroshot", "--model", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "not a DiffDis model folder" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_benchmark_train_writes_ratio_against_the_diffusers_step(tmp_path):
    out = tmp_path / "t.json"
    args = ["train", "--steps-per-round", "1", "--repeats", "1", "--batch-size", "4", "--out", str(out),
            "model.unet.block_out_channels=[16,32]", "model.unet.norm_num_groups=8"]
    assert benchmark.main(args) == 0
    result = json.loads(out.read_text())
    assert result["ratio"] == pytest.approx(result["ours_step_s"] / result["reference_step_s"])
    assert result["ours_img_s"] == pytest.approx(4 / result["ours_step_s"])
    # the default folds 2x2 patches: 16x16 images are 8x8x12 latents for both steps
    assert result["train_batch"] == 4 and result["latent_shape"] == [12, 8, 8] and result["image_size"] == 16
    assert result["overrides"][0] == "model.unet.block_out_channels=[16,32]"


def test_benchmark_train_bad_override_is_one_line(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert benchmark.main(["train", "--out", str(out), "loss.lambda_itaa=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "lambda_itaa" in err and "\n" not in err
    assert not out.exists()
