"""The trainer end to end: accelerate launch, files written, exact resume, two processes, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import TRAIN, accelerate, train_env
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    """A local imagefolder (metadata.jsonl) of 16 embedded images, as a user would bring."""
    from diffdis.data import export_imagefolder, make_embedded_dataset
    from datasets import DatasetDict

    root = tmp_path_factory.mktemp("imgfolder")
    export_imagefolder(DatasetDict(train=make_embedded_dataset("train", 16)), root)
    return root


@pytest.mark.slow
def test_trains_on_a_local_imagefolder(tmp_path, tiny_overrides, tiny_imagefolder):
    out = tmp_path / "folder_run"
    accelerate(tiny_overrides + [f"data.name={tiny_imagefolder}", "data.validation_split=null", f"train.output_dir={out}",
                                 "train.max_steps=1", "train.checkpointing_steps=0"])
    assert (out / "model" / "model_index.json").is_file()


@pytest.mark.slow
def test_patch_and_plain_pixel_models_save_what_the_pipeline_loads(tmp_path, tiny_overrides):
    """The default folds 2x2 patches (a vae/ folder with a PatchAutoencoder); patch_size=1 is plain pixel space."""
    from diffdis.models.patch_autoencoder import PatchAutoencoder
    from diffdis.pipelines import DiffDisPipeline

    plain = ["model.patch_size=1", "model.unet.in_channels=3", "model.unet.out_channels=3", "model.unet.sample_size=16"]
    for name, extra in (("patch", []), ("plain", plain)):
        out = tmp_path / name
        accelerate(tiny_overrides + extra + [f"train.output_dir={out}", "train.max_steps=1", "train.checkpointing_steps=0",
                                             "train.validation_every=0"])
        pipe = DiffDisPipeline.from_pretrained(out / "model")
        pipe.set_progress_bar_config(disable=True)
        images = pipe(["a red circle"], num_inference_steps=2, output_type="np").images
        assert images.shape == (1, 16, 16, 3)
        if name == "patch":
            assert isinstance(pipe.vae, PatchAutoencoder) and pipe.unet.config.in_channels == 12
        else:
            assert pipe.vae is None and not (out / "model" / "vae").exists()


def weights(model_dir: Path):
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_two_step_run_writes_everything(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    proc = accelerate(tiny_overrides + [f"train.output_dir={out}", "train.max_steps=2", "train.checkpointing_steps=1"])
    assert "model saved to" in proc.stdout
    for rel in ["config.yaml", "tokenizer/tokenizer.json", "checkpoint-1/trainer_state.json", "checkpoint-1/unet/config.json",
                "checkpoint-1/text_encoder/config.json", "checkpoint-1/optimizer.bin", "model/model_index.json",
                "model/unet/diffusion_pytorch_model.safetensors", "model/text_encoder/config.json", "model/tokenizer/tokenizer.json",
                "model/scheduler/scheduler_config.json", "model/diffdis_config.yaml", "model/zeroshot_index.json", "logs/history.jsonl", "curves.png",
                "train_summary.json"]:
        assert (out / rel).exists(), rel
    assert not list(out.glob("*.tmp"))
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard events missing"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["num_processes"] == 1
    rows = [json.loads(l) for l in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert any("val/loss_ita" in r for r in rows) and any("train/loss_ig" in r for r in rows)
    cfg = json.loads((out / "model" / "unet" / "config.json").read_text())
    assert cfg["_class_name"] == "DualStreamUNet"


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_overrides):
    common = tiny_overrides + ["train.max_steps=4", "train.checkpointing_steps=2", "train.checkpoints_total_limit=5",
                               "data.num_train_samples=12", "train.validation_every=0"]  # 3 steps per epoch: resume crosses an epoch
    straight = tmp_path / "straight"
    accelerate(common + [f"train.output_dir={straight}"])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copytree(straight / "tokenizer", resumed / "tokenizer")
    proc = accelerate(common + [f"train.output_dir={resumed}", "train.resume_from_checkpoint=latest"])
    assert "resumed from" in proc.stderr + proc.stdout
    a, b = weights(straight / "model"), weights(resumed / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training diverged from uninterrupted training"
    # and the checkpoint really differs from the end point (the test can fail)
    mid = load_file(str(straight / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not all(torch.equal(a[k], mid[k]) for k in a)


def test_images_kept_in_memory_train_exactly_as_images_decoded_each_epoch(tmp_path, tiny_overrides):
    common = tiny_overrides + ["train.max_steps=6", "train.checkpointing_steps=0", "data.num_train_samples=12",
                               "train.validation_every=0"]  # 3 steps per epoch: the second epoch reads kept images
    kept, decoded = tmp_path / "kept", tmp_path / "decoded"
    proc = accelerate(common + [f"train.output_dir={kept}"])
    assert "decoded images kept in memory" in proc.stderr + proc.stdout
    proc = accelerate(common + [f"train.output_dir={decoded}", "data.memory_cache_mb=0"])
    assert "decoded images kept in memory" not in proc.stderr + proc.stdout
    worker = tmp_path / "worker"  # a persistent DataLoader worker keeps its own images from epoch to epoch
    proc = accelerate(common + [f"train.output_dir={worker}", "data.num_workers=1"])
    assert "per worker" in proc.stderr + proc.stdout
    a, b, c = weights(kept / "model"), weights(decoded / "model"), weights(worker / "model")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a), "kept images changed the training"


@pytest.mark.slow
def test_two_processes_keep_replicas_identical(tmp_path, tiny_overrides):
    # loss.ita_every=2: step 1 leaves the text stream without gradients; DDP must carry on into step 2
    out = tmp_path / "ddp"
    accelerate(tiny_overrides + [f"train.output_dir={out}", "train.max_steps=3", "train.checkpointing_steps=0", "loss.ita_every=2",
                                 "train.log_every=1"], num_processes=2)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 3
    sums = summary["replica_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    rows = [json.loads(l) for l in (out / "logs" / "history.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss_ig" in r]
    assert len(logged) == 3 and all("train/loss_ita" in r for r in logged)  # the step without L_ITA logs the last one


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=2", "max_stepz"),  # refused before the trainer starts
        pytest.param("data.name=/no/such/folder", "no/such/folder", marks=pytest.mark.slow),
        pytest.param("data.caption_column=nope", "nope", marks=pytest.mark.slow),
        pytest.param("data.image_column=pixels", "pixels", marks=pytest.mark.slow),
        pytest.param("train.resume_from_checkpoint=/no/ckpt", "not a complete diffdis checkpoint", marks=pytest.mark.slow),
    ],
)
def test_bad_input_one_line_error(tmp_path, tiny_overrides, override, message, tiny_imagefolder):
    out = tmp_path / "bad"
    if "_column" in override:  # column names apply to real datasets: use a local imagefolder
        override = [f"data.name={tiny_imagefolder}", "data.validation_split=null", override]
    else:
        override = [override]
    proc = subprocess.run([sys.executable, TRAIN] + tiny_overrides + [f"train.output_dir={out}", "train.max_steps=1"] + override,
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1]
    assert last.startswith("error:") and message in last, proc.stderr[-2000:]
    assert not out.exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("model.unet.block_out_channels=[16,48]", "is [32] in"),
        ("model.text_encoder.num_hidden_layers=2", "of this config's model is not in"),
        ("model.train_text_encoder=false", "different number of parameter groups"),
    ],
)
def test_resuming_a_checkpoint_of_another_config_is_a_one_line_error(tmp_path, tiny_overrides, override, message):
    out = tmp_path / "run"
    common = tiny_overrides + [f"train.output_dir={out}", "train.validation_every=0"]
    accelerate(common + ["train.max_steps=2", "train.checkpointing_steps=1"])  # writes checkpoint-1
    config_before, model_before = (out / "config.yaml").read_bytes(), weights(out / "model")
    proc = subprocess.run([sys.executable, TRAIN] + common + ["train.max_steps=3", "train.resume_from_checkpoint=latest", override],
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1]
    assert last.startswith("error: ValueError: resume_from_checkpoint:") and message in last, proc.stderr[-2000:]
    assert (out / "config.yaml").read_bytes() == config_before  # the folder still describes the run that made it
    after = weights(out / "model")
    assert all(torch.equal(model_before[k], after[k]) for k in model_before)
