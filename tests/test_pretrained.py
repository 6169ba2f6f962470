"""``model.pretrained``: a Stable Diffusion 1.x folder loads into DiffDis, generates exactly as vanilla diffusers
before any training (zero-init, end to end), fine-tunes with the sd15 config, and exports back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from helpers_tiny import save_tiny_stable_diffusion
from helpers_train import TRAIN, accelerate, train_env
from transformers import CLIPTextModel, CLIPTokenizer

from diffdis.config import load_config
from diffdis.models import DualStreamUNet
from diffdis.pipelines import DiffDisPipeline, export_stable_diffusion
from diffdis.train.build import build_components

PROMPTS = ["a red circle", "a blue square on the left"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


def _generate(pipe, guidance: float) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2 * len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, num_images_per_prompt=2,
                output_type="np", generator=generators).images


@pytest.mark.parametrize("fusion", ["joint", "one_way"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sd_weights_in_dual_stream_unet_generate_like_vanilla_diffusers(sd_folder, fusion, guidance):
    cfg = load_config("sd15", [f"model.pretrained={sd_folder}", "data.name=embedded", f"model.fusion={fusion}"])
    c = build_components(cfg)
    assert isinstance(c.unet, DualStreamUNet) and isinstance(c.text_encoder, CLIPTextModel)
    assert isinstance(c.tokenizer, CLIPTokenizer)
    assert c.noise_scheduler.config.steps_offset == 1  # SD's inference settings kept in the saved model
    scheduler = DDIMScheduler.from_pretrained(sd_folder, subfolder="scheduler")
    ours = DiffDisPipeline(unet=c.unet.eval(), text_encoder=c.text_encoder.eval(), tokenizer=c.tokenizer,
                           scheduler=scheduler, vae=c.vae.eval())
    vanilla = StableDiffusionPipeline.from_pretrained(sd_folder)
    a, b = _generate(ours, guidance), _generate(vanilla, guidance)
    assert a.shape == b.shape == (4, 16, 16, 3)
    assert np.abs(a - b).max() < 1e-4


def _partial_copy(sd_folder: Path, dest: Path, subfolders) -> Path:
    """``dest`` holding only ``subfolders`` of the tiny SD folder (as links)."""
    dest.mkdir()
    for sub in subfolders:
        os.symlink(sd_folder / sub, dest / sub)
    return dest


@pytest.mark.slow
def test_a_folder_without_unet_is_a_one_line_error_and_writes_nothing(sd_folder, tmp_path):
    broken = _partial_copy(sd_folder, tmp_path / "sd", ("tokenizer", "text_encoder", "vae", "scheduler"))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, TRAIN, "--config", "sd15", f"model.pretrained={broken}", "data.name=embedded",
                           "data.resolution=16", "train.mixed_precision=no", f"train.output_dir={out}"],
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("error: ComponentError: cannot load UNet from"), proc.stderr[-2000:]
    assert not out.exists()


def test_a_folder_without_scheduler_takes_the_config_noise_section(sd_folder, tmp_path):
    partial = _partial_copy(sd_folder, tmp_path / "sd", ("tokenizer", "text_encoder", "vae", "unet"))
    cfg = load_config("sd15", [f"model.pretrained={partial}", "data.name=embedded", "noise.prediction_type=v_prediction"])
    scheduler = build_components(cfg).noise_scheduler
    assert scheduler.config.steps_offset == 0 and scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012


@pytest.mark.slow
def test_fine_tunes_a_stable_diffusion_folder_and_exports_it_back(sd_folder, tmp_path):
    out = tmp_path / "run"
    accelerate([
        "--config", "sd15", f"model.pretrained={sd_folder}", "data.name=embedded", "data.resolution=16",
        "data.num_train_samples=16", "data.validation_split=null", "data.num_workers=0", f"train.output_dir={out}",
        "train.max_steps=2", "train.batch_size=4", "train.gradient_accumulation_steps=1", "train.mixed_precision=no",
        "train.checkpointing_steps=0", "train.lr_warmup_steps=1", "train.learning_rate=1e-3",
        "train.learning_rate_new=1e-3", "train.report_to=tensorboard",
    ])
    pipe = DiffDisPipeline.from_pretrained(out / "model")
    assert isinstance(pipe.unet, DualStreamUNet) and isinstance(pipe.text_encoder, CLIPTextModel)
    base = StableDiffusionPipeline.from_pretrained(sd_folder)
    tuned = pipe.unet.to_unet2d().state_dict()
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, tuned[k])]
    assert changed, "two fine-tuning steps left every UNet weight as loaded"
    for k, v in base.text_encoder.state_dict().items():  # train_text_encoder: false in sd15
        torch.testing.assert_close(pipe.text_encoder.state_dict()[k], v, rtol=0, atol=0)
    export_stable_diffusion(pipe, tmp_path / "export")
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    a, b = _generate(pipe, 3.0), _generate(exported, 3.0)
    assert np.abs(a - b).max() < 1e-4
