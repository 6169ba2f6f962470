"""benchmarks/: each benchmark runs in a tiny setting; both arms ran the same work, the reference arm is the diffusers
one, the JSON has every field with positive finite timings; bad input is a one-line error."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_tiny import CONTEXT_DIM, tiny_components

from benchmarks import run
from benchmarks.timing import time_interleaved
from diffdis.models import DualStreamUNet
from diffdis.pipelines import DiffDisPipeline
from diffdis.pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline

# what run.py adds to every result
COMMON = ("benchmark", "model", "device", "device_name", "dtype", "torch_threads", "torch_version", "batch_size",
          "repeats", "wall_s", "command", "commit", "machine")
SAMPLE = ("ours_s", "vanilla_s", "ratio", "ours_runs_s", "vanilla_runs_s", "steps", "num_prompts", "resolution",
          "image_size", "guidance", "scheduler", "vae", "unet_generation_params", "xformers", "reference",
          "ours_pipeline", "vanilla_pipeline", "ours_output_shape", "vanilla_output_shape", "ours_unet_calls",
          "vanilla_unet_calls", "ours_unet_input_shape", "vanilla_unet_input_shape")
ZEROSHOT = ("steps", "guidance", "batch_size", "dc_timesteps", "dc_classes", "class_counts", "latent_shape",
            "joint_img_s", "one_way_cached_img_s", "class_count_ratio", "one_way_speedup", "diffusion_classifier_img_s",
            "diffusion_classifier_slowdown", "joint_fusion", "one_way_cached_fusion", "joint_uses_cache",
            "one_way_cached_uses_cache", "diffusion_classifier_logits_shape", "resolution", "images", "reference")
TRAIN = ("ours_step_s", "reference_step_s", "ratio", "ours_img_s", "reference_img_s", "ours_runs_s",
         "reference_runs_s", "steps_per_round", "train_batch", "latent_shape", "ours_unet", "reference_unet",
         "ours_text_encoder", "reference_text_encoder", "ours_optimizer", "reference_optimizer",
         "ours_unet_input_shape", "reference_unet_input_shape", "image_size", "unet_generation_params", "preset",
         "overrides", "lambda_ita", "ig_fraction", "prediction_type", "reference",
         "equal_work_step_s", "equal_work_img_s", "equal_work_runs_s", "equal_work_ratio", "equal_work_unet",
         "equal_work_unet_input_shape", "reference_same_optimizer_step_s", "reference_same_optimizer_runs_s",
         "equal_work_ratio_same_optimizer", "ratios", "ours_optimizer_fused", "reference_optimizer_fused",
         "reference_same_optimizer_optimizer_fused", "ita_fraction", "note", "load_average_before", "equal_work")
SMALL_UNET = ["model.unet.block_out_channels=[16,32]", "model.unet.norm_num_groups=8", "model.unet.attention_head_dim=2",
              "model.text_encoder.hidden_size=32", "model.text_encoder.num_hidden_layers=1",
              "model.text_encoder.num_attention_heads=2", "model.text_encoder.intermediate_size=64",
              "model.text_encoder.projection_dim=16", "model.post_mid_layers=1"]


def _run(argv, out: Path) -> dict:
    assert run.main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _check_fields(result: dict, fields) -> None:
    missing = [k for k in (*COMMON, *fields) if k not in result]
    assert not missing, missing


def _check_positive(result: dict, keys) -> None:
    for key in keys:
        values = result[key] if isinstance(result[key], list) else [result[key]]
        assert values and all(math.isfinite(v) and v > 0 for v in values), (key, result[key])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny DiffDis model folders: pixel space (8x8 images) and latent space (16x16 images, AutoencoderKL)."""
    folders = {}
    for name in ("pixel", "latent"):
        parts = tiny_components(latent=name == "latent", with_projection=True)
        parts["unet"] = DualStreamUNet.from_unet(parts["unet"], text_dim=CONTEXT_DIM)
        folders[name] = tmp_path_factory.mktemp(name)
        DiffDisPipeline(**parts).save_pretrained(folders[name])
        DiffDisZeroShotPipeline(**parts, text_scale=0.8).save_index(folders[name])  # over the same components
    return folders


def test_time_interleaved_warms_up_then_rotates_who_goes_first():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    times = time_interleaved(calls, 3, torch.device("cpu"))
    assert order == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(calls, 0, torch.device("cpu"))


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_sample_both_pipelines_do_the_same_work(model_dirs, space, tmp_path):
    result = _run(["sample", "--model", str(model_dirs[space]), "--steps", "2", "--repeats", "2", "--batch-size", "2",
                   "--device", "cpu"], tmp_path / "s.json")
    _check_fields(result, SAMPLE)
    assert result["vanilla_pipeline"] == (
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline")
    assert result["ours_pipeline"] == "diffdis.pipelines.text_to_image.DiffDisPipeline"
    size = result["resolution"]  # what both were called at
    assert result["ours_output_shape"] == result["vanilla_output_shape"] == [2, size, size, 3]
    assert result["ours_unet_calls"] == result["vanilla_unet_calls"] == 2  # one batched (cond, uncond) call per step
    assert result["ours_unet_input_shape"] == result["vanilla_unet_input_shape"]
    assert result["ours_unet_input_shape"][0] == 4  # 2 prompts, with and without the text
    assert result["steps"] == 2 and result["num_prompts"] == result["batch_size"] == 2 and result["repeats"] == 2
    assert len(result["ours_runs_s"]) == len(result["vanilla_runs_s"]) == 2
    _check_positive(result, ("ours_s", "vanilla_s", "ratio", "ours_runs_s", "vanilla_runs_s", "wall_s",
                             "unet_generation_params"))
    if space == "pixel":  # both pipelines got the same stand-in VAE, called at the model's own size
        assert "stand-in" in result["vae"] and size == result["image_size"] == 8
    else:
        assert result["vae"] == "the model's own" and size == result["image_size"] == 16
    assert result["benchmark"] == "sample" and result["command"].startswith("python benchmarks/run.py sample")


def test_zeroshot_arms_classify_the_same_images(model_dirs, tmp_path):
    result = _run(["zeroshot", "--model", str(model_dirs["pixel"]), "--steps", "2", "--repeats", "1",
                   "--batch-size", "2", "--classes", "10", "50", "--dc-timesteps", "2", "--dc-images", "1",
                   "--device", "cpu"], tmp_path / "z.json")
    _check_fields(result, (*ZEROSHOT, "diffdis_10_classes_img_s", "diffdis_50_classes_img_s"))
    arms = ("diffdis_10_classes", "diffdis_50_classes", "joint", "one_way_cached")
    for arm in arms:
        assert result[f"{arm}_predictions_shape"] == [2], arm  # every arm classified the whole batch
    assert result["latent_shape"] == [3, 8, 8] and result["batch_size"] == 2 and result["class_counts"] == [10, 50]
    # the fusion arms really switch the fusion (and the cache) on the same weights
    assert (result["joint_fusion"], result["joint_uses_cache"]) == ("joint", False)
    assert (result["one_way_cached_fusion"], result["one_way_cached_uses_cache"]) == ("one_way", True)
    # the reference: the diffusion classifier over the first class count
    assert result["diffusion_classifier_logits_shape"] == [1, 10] and result["dc_classes"] == 10
    assert result["adaptive_dc_logits_shape"] == [1, 10] and (result["dc_keep"], result["dc_first_timesteps"]) == (5, 1)
    assert result["reference"].startswith("diffdis.pipelines.zeroshot.diffusion_classifier_logits")
    _check_positive(result, (*(f"{arm}_img_s" for arm in arms), "class_count_ratio", "one_way_speedup",
                             "diffusion_classifier_img_s", "diffusion_classifier_slowdown", "adaptive_dc_img_s",
                             "adaptive_dc_speedup", "wall_s"))


def test_train_reference_is_the_plain_diffusers_step_on_the_same_batch(tmp_path):
    result = _run(["train", "--steps-per-round", "1", "--repeats", "2", "--batch-size", "4", "--device", "cpu",
                   "--profile-steps", "1", "--note", "shared machine", *SMALL_UNET], tmp_path / "t.json")
    _check_fields(result, TRAIN)
    assert result["reference_unet"] == "diffusers.models.unets.unet_2d_condition.UNet2DConditionModel"
    assert result["ours_unet"] == result["equal_work_unet"] == "diffdis.models.dual_stream_unet.DualStreamUNet"
    assert result["reference_text_encoder"] == result["ours_text_encoder"]
    assert result["reference_optimizer"] == result["ours_optimizer"] == "torch.optim.adamw.AdamW"
    # the script's default AdamW; ours fuses it on CPU, and so does the like-for-like reference
    assert not result["reference_optimizer_fused"]
    assert result["ours_optimizer_fused"] and result["reference_same_optimizer_optimizer_fused"]
    # the default folds 2x2 patches: 16x16 images are 8x8x12 latents for both generation UNets; the default recipe
    # runs L_IG on half the batch, equal work on all of it
    assert result["reference_unet_input_shape"] == result["equal_work_unet_input_shape"] == result["latent_shape"] == [12, 8, 8]
    assert result["ours_unet_input_shape"] == [12, 8, 8] and result["ig_fraction"] == 0.5
    assert result["train_batch"] == result["batch_size"] == 4 and result["image_size"] == 16
    assert result["overrides"] == SMALL_UNET and result["steps_per_round"] == 1 and result["note"] == "shared machine"
    _check_positive(result, ("ours_step_s", "reference_step_s", "ratio", "ours_img_s", "reference_img_s", "ours_runs_s",
                             "reference_runs_s", "wall_s", "equal_work_step_s", "equal_work_ratio",
                             "equal_work_ratio_same_optimizer", "reference_same_optimizer_step_s"))
    spread = result["ratios"]["equal_work/reference"]
    assert spread["rounds"] == 2 and spread["min"] <= spread["q1"] <= spread["median"] <= spread["q3"] <= spread["max"]
    profile = result["profile"]
    assert set(profile["reference"]["phases_ms"]) == {"text_encoder", "data", "generation_forward",
                                                      "generation_backward", "optimizer"}
    assert set(profile["equal_work"]["phases_ms"]) == {"text_encoder", "generation_forward", "discrimination_forward",
                                                       "generation_backward", "discrimination_backward", "optimizer"}
    # the discrimination pass runs the encoder half and the mid block, never the decoder
    assert profile["equal_work"]["gflop"] > profile["reference"]["gflop"] > 0
    assert result["discrimination_pass_ran"] == ["time_proj", "time_embedding", "conv_in", "down_blocks.0",
                                                 "down_blocks.1", "mid_block"]


def test_train_phased_step_is_the_step():
    """The profiled step, split into phases, computes the loss of the real one."""
    from benchmarks.common import build_tiny
    from benchmarks.train import _ours_step, _no_phase
    from diffdis.config import load_config

    cfg = load_config(None, SMALL_UNET)
    components = build_tiny(cfg)
    u = components.unet.config
    latents = torch.randn(4, u.in_channels, u.sample_size, u.sample_size, generator=torch.Generator().manual_seed(0))
    tok = components.tokenizer
    ids = tok(["a red circle", "a blue square", "a green star", ""], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    plain, _ = _ours_step(cfg, components, latents, ids[:3].repeat(2, 1)[:4], ids[3:])
    phased, _ = _ours_step(cfg, components, latents, ids[:3].repeat(2, 1)[:4], ids[3:])
    assert phased(_no_phase) == pytest.approx(plain(), rel=1e-6)


def test_presets_run_with_random_weights(tmp_path):
    """The default (no --model): configs/tiny.yaml's patch model, whose PatchAutoencoder the stand-in VAE replaces."""
    result = _run(["sample", "--steps", "1", "--repeats", "1", "--batch-size", "1", "--device", "cpu"],
                  tmp_path / "s.json")
    _check_fields(result, SAMPLE)
    # 16x16 images are 8x8 latents, which the stand-in VAE (factor 1) is called at
    assert result["image_size"] == 16 and result["resolution"] == 8 and "PatchAutoencoder" in result["vae"]
    assert result["ours_output_shape"] == result["vanilla_output_shape"] == [1, 8, 8, 3]
    assert result["model"] == "tiny preset, random weights"
    result = _run(["zeroshot", "--steps", "1", "--repeats", "1", "--batch-size", "1", "--classes", "10", "20",
                   "--dc-timesteps", "1", "--dc-images", "1", "--device", "cpu"], tmp_path / "z.json")
    _check_fields(result, ZEROSHOT)
    assert result["latent_shape"] == [12, 8, 8] and result["diffusion_classifier_logits_shape"] == [1, 10]


def test_bad_input_is_one_line(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert run.main(["sample", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run.main(["zeroshot", "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "not a DiffDis model folder" in capsys.readouterr().err
    assert run.main(["sample", "--repeats", "0", "--out", str(out)]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert run.main(["train", "--out", str(out), "loss.lambda_itaa=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "lambda_itaa" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.slow
def test_run_py_is_a_script(tmp_path):
    """``python benchmarks/run.py`` from another folder finds its package and the library and writes the JSON."""
    out = tmp_path / "t.json"
    argv = ["train", "--steps-per-round", "1", "--repeats", "1", "--batch-size", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(Path(run.__file__)), *argv, *SMALL_UNET], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    _check_fields(result, TRAIN)
    assert shlex.split(result["command"]) == ["python", "benchmarks/run.py", *argv, *SMALL_UNET]
    assert result["commit"] is None or len(result["commit"]) == 40
    assert "ratio" in proc.stdout and f"wrote {out}" in proc.stdout


def test_train_gpu_options_apply_to_every_arm(tmp_path):
    """channels_last, regional compilation (dynamo's eager backend here) and the FLOP count behind MFU, on the CPU."""
    result = _run(["train", "--steps-per-round", "1", "--repeats", "1", "--batch-size", "2", "--device", "cpu",
                   "--channels-last", "--compile", "eager", "--peak-tflops", "2.0", *SMALL_UNET], tmp_path / "t.json")
    _check_fields(result, (*TRAIN, "attention", "compile", "channels_last", "peak_tflops"))
    assert result["attention"] == "sdpa" and result["compile"] == "eager" and result["channels_last"]
    arms = ("equal_work", "ours", "reference", "reference_same_optimizer")
    assert all(result[f"{arm}_unet_input_channels_last"] for arm in arms)  # every UNet was fed channels_last
    # two down blocks, the mid block and two up blocks of each arm's generation UNet
    assert result["compiled_blocks"] == {arm: 5 for arm in ("equal_work", "ours", "reference",
                                                           "reference_same_optimizer")}
    # the reference step counts the most FLOPs with L_IG on the whole batch; ours adds the discrimination pass
    assert result["equal_work_tflop_per_step"] > result["reference_tflop_per_step"] > result["ours_tflop_per_step"] / 2 > 0
    assert result["reference_tflop_per_step"] == result["reference_same_optimizer_tflop_per_step"]
    for arm in ("ours", "equal_work", "reference"):
        achieved = result[f"{arm}_tflop_per_step"] / result[f"{arm}_step_s"]
        assert result[f"{arm}_tflops"] == pytest.approx(achieved)
        assert result[f"{arm}_mfu"] == pytest.approx(achieved / 2.0)


def test_train_mfu_needs_a_peak(tmp_path, monkeypatch, capsys):
    """Without --peak-tflops the CPU has no peak: MFU is null, the FLOPs are still counted; bad --compile and
    --peak-tflops values and xformers without CUDA are one-line errors."""
    result = _run(["train", "--steps-per-round", "1", "--repeats", "1", "--batch-size", "2", "--device", "cpu",
                   *SMALL_UNET], tmp_path / "t.json")
    assert result["peak_tflops"] is None and result["reference_mfu"] is None and result["reference_tflops"] > 0
    assert result["compile"] is None and result["compiled_blocks"]["ours"] == 0 and not result["channels_last"]
    assert result["ours_unet_input_channels_last"] is False and result["reference_unet_input_channels_last"] is False
    out = tmp_path / "x.json"
    assert run.main(["train", "--compile", "no_such_backend", "--device", "cpu", "--out", str(out), *SMALL_UNET]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown torch.compile backend 'no_such_backend'" in err and "\n" not in err
    assert run.main(["train", "--peak-tflops", "0", "--device", "cpu", "--out", str(out), *SMALL_UNET]) == 2
    assert "--peak-tflops must be above 0" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.main(["train", "--attention", "xformers", "--device", "cpu", "--out", str(tmp_path / "x.json"),
                     *SMALL_UNET]) == 2
    assert "xformers needs CUDA" in capsys.readouterr().err


def test_train_sd15_preset_needs_no_data(monkeypatch, tmp_path):
    """``train --preset sd15`` as documented: the sd15 config, which requires data.name, loads without one."""
    from benchmarks import train

    def stop(resolution):
        raise RuntimeError(f"built sd15 components at {resolution}")

    monkeypatch.setattr(train, "sd15_components", stop)
    args = run.build_parser().parse_args(["train", "--preset", "sd15", "--resolution", "256"])
    with pytest.raises(RuntimeError, match="built sd15 components at 256"):
        train.run(args, torch.device("cpu"), torch.float32)


def test_sample_profile_finds_where_time_goes(model_dirs, tmp_path):
    result = _run(["sample", "--model", str(model_dirs["pixel"]), "--steps", "2", "--repeats", "1", "--batch-size",
                   "2", "--device", "cpu", "--profile"], tmp_path / "s.json")
    profile = result["profile"]
    assert profile["time"] == "cpu"
    for arm in ("ours", "vanilla"):
        p = profile[arm]
        assert p["ops_called"] > 0 and p["self_ms_total"] > 0 and len(p["top_ops_ms"]) == 15
        assert all(v >= 0 for v in p["top_ops_ms"].values())
        assert p["casts"] >= 0 and p["syncs"] >= 0 and p["kernel_launches"] == 0  # no CUDA here
    # the same UNet runs in both: its convolutions are among the largest in each, and the differences are ranked
    assert any("conv" in op for op in profile["ours"]["top_ops_ms"])
    extra = list(profile["extra_in_ours_ms"].values())
    assert len(extra) == 15 and extra == sorted(extra, reverse=True)


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_command(tmp_path):
    """benchmarks/gpu.sh --smoke: the GPU measurements' commands at tiny size on the CPU, each writing its result."""
    script = Path(run.__file__).parent / "gpu.sh"
    proc = subprocess.run(["bash", str(script), str(tmp_path), "--smoke"], capture_output=True, text=True,
                          timeout=900, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("sample_sdpa", "train_sdpa", "train_channels_last", "train_compile", "train_profile"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["device"] == "cpu" and result["ratio"] > 0, name
    assert "profile" in json.loads((tmp_path / "sample_sdpa.json").read_text())
    assert json.loads((tmp_path / "train_compile.json").read_text())["compile"] == "eager"
    assert json.loads((tmp_path / "tiny_trainer" / "train_summary.json").read_text())["global_step"] == 3
    assert "(0 failed)" in proc.stdout


def test_data_keeps_every_image_and_times_both_loaders(tmp_path, capsys):
    out = tmp_path / "data.json"
    result = _run(["data", "--batches", "3", "--repeats", "1", "data.num_train_samples=64", "train.batch_size=8"], out)
    _check_fields(result, ("kept_ms_per_batch", "decoded_ms_per_batch", "speedup", "first_epoch_s", "reference"))
    _check_positive(result, ("kept_ms_per_batch", "decoded_ms_per_batch", "speedup", "first_epoch_s", "kept_mb"))
    assert result["kept_examples"] == result["num_examples"] == 64 and result["first_epoch_batches"] == 8
    assert result["batches_per_round"] == 3 and [len(t) for t in result["times_s"].values()] == [1, 1]
    assert result["command"].startswith("python benchmarks/run.py data")
    assert run.main(["data", "--out", str(tmp_path / "none.json"), "data.num_train_samples=64", "data.memory_cache_mb=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nothing would be kept" in err and "\n" not in err
    assert not (tmp_path / "none.json").exists()


@pytest.mark.slow
def test_methods_counts_and_times_every_method_on_one_batch(tmp_path, capsys):
    """Each method's step is counted and timed; diffdis's step is its generation pass plus its discrimination pass
    (more FLOPs than either method that runs only one of them, less than both together: one text encoder)."""
    out = tmp_path / "methods.json"
    names = ["clip", "disc_only", "gen_only", "diffdis"]
    result = _run(["methods", "--methods", *names, "--steps", "1", "--repeats", "1", "--device", "cpu",
                   "train.batch_size=8", *SMALL_UNET], out)
    _check_fields(result, [f"{n}_{k}" for n in names for k in ("gflop", "ms", "flop_ratio", "time_ratio")])
    _check_positive(result, [f"{n}_{k}" for n in names for k in ("gflop", "ms", "flop_ratio", "time_ratio")])
    assert result["clip_flop_ratio"] == result["clip_time_ratio"] == 1.0 and result["reference_method"] == "clip"
    assert {n: result["ran"][n]["input_shape"] for n in names} == {
        "clip": [8, 3, 16, 16], "disc_only": [8, 12, 8, 8], "gen_only": [8, 12, 8, 8], "diffdis": [8, 12, 8, 8]}
    flops = {n: result[f"{n}_gflop"] for n in names}
    assert max(flops["disc_only"], flops["gen_only"]) < flops["diffdis"] < flops["disc_only"] + flops["gen_only"]
    assert [len(t) for t in result["round_seconds"].values()] == [1] * 4 and result["train_batch"] == 8
    assert run.main(["methods", "--methods", "diffdis", "--out", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--reference clip" in err and "\n" not in err
    assert not (tmp_path / "bad.json").exists()
