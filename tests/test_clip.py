"""method=clip: the CLIP baseline through the method seam (its loss, training, saving, zero-shot and evaluation)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from helpers_train import train_two_processes_resume_and_evaluate
from helpers_tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet

import diffdis.methods as methods
from diffdis.config import ConfigError, load_config
from diffdis.models import DualStreamUNet
from diffdis.pipelines.clip_pipeline import ClipZeroShotPipeline
from diffdis.pipelines.zeroshot_pipeline import load_zero_shot_pipeline
from diffdis.train.build import Components, build_optimizer

CLIP = ["method=clip", "data.resolution=8", "model.clip.patch_size=4", "model.clip.hidden_size=32",
        "model.clip.num_hidden_layers=1", "model.clip.num_attention_heads=2", "model.clip.intermediate_size=64",
        "model.text_encoder.projection_dim=16"]


def _built(overrides=()):
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim)
    components = Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000))
    cfg = load_config(None, CLIP + list(overrides))
    return methods.build(cfg, components), components, cfg


def _colour_batch(tok, n: int = 8):
    """Half red, half blue 8x8 images in [-1, 1] and their captions' ids."""
    red, blue = torch.tensor([0.9, -0.8, -0.8]), torch.tensor([-0.8, -0.8, 0.9])
    pixels = torch.stack([(red if i % 2 == 0 else blue).view(3, 1, 1).expand(3, 8, 8) for i in range(n)])
    ids = tok(["a red circle", "a blue circle"] * (n // 2), padding="max_length", max_length=16, return_tensors="pt").input_ids
    return pixels, ids


def test_clip_learns_to_match_images_and_captions():
    torch.manual_seed(0)
    method, components, cfg = _built(["train.learning_rate=3e-3"])
    assert method.input_space == "pixels" and not method.generates and method.discriminates
    # the text tower starts as the run's text encoder
    ids = _colour_batch(components.tokenizer)[1]
    torch.testing.assert_close(method.clip.get_text_features(input_ids=ids).pooler_output,
                               components.text_encoder(input_ids=ids).text_embeds)
    optimizer = build_optimizer(cfg, method)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(method.clip.parameters()))
    pixels, ids = _colour_batch(components.tokenizer)
    empty = ids[:1]
    first = None
    for _ in range(40):
        out = method(pixels, ids, empty, torch.Generator().manual_seed(0), gather=False)
        first = first if first is not None else out["loss"].item()
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert set(method.loss_keys()) <= set(out)
    assert out["loss"].item() < 0.7 * first, (first, out["loss"].item())
    pipe = method.zero_shot_pipeline(components, cfg)
    logits = pipe(pixels[:2], ["a red circle", "a blue circle"]).logits_per_image  # (2, 2)
    assert logits.argmax(dim=1).tolist() == [0, 1]


def test_clip_config_errors():
    with pytest.raises(ConfigError, match="multiple of model.clip.patch_size"):
        _built(["model.clip.patch_size=3"])
    with pytest.raises(ConfigError, match="latent cache"):
        _built(["data.cache_dir=/tmp/nowhere"])


def test_clip_saves_a_zero_shot_pipeline_and_no_generator(tmp_path):
    method, components, cfg = _built()
    method.save_pretrained(tmp_path, components, cfg)
    assert (tmp_path / "zeroshot_index.json").is_file() and not (tmp_path / "model_index.json").exists()
    pipe = load_zero_shot_pipeline(tmp_path)
    assert isinstance(pipe, ClipZeroShotPipeline) and pipe.resolution == 8
    pixels, _ = _colour_batch(components.tokenizer, 4)
    torch.testing.assert_close(pipe.encode_images(pixels), method.zero_shot_pipeline(components, cfg).encode_images(pixels))
    with pytest.raises(ValueError, match="does not generate"):
        method.text_to_image_pipeline(components)


@pytest.mark.slow
def test_clip_trains_in_two_processes_resumes_and_is_evaluated(tmp_path, tiny_overrides, monkeypatch):
    args = tiny_overrides + CLIP[:1] + CLIP[2:]
    train_two_processes_resume_and_evaluate(tmp_path / "clip", args, "clip", "ClipZeroShotPipeline", "clip", tmp_path, monkeypatch)
