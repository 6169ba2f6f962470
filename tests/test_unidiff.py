"""method=unidiff: CLIP and the UNet's generation stream trained with ITC, IS and RSC (losses, what each trains,
saving both pipelines, training in two processes and evaluation)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from helpers_train import accelerate
from helpers_tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet

import diffdis.methods as methods
from diffdis.config import ConfigError, load_config
from diffdis.eval.api import applicable
from diffdis.models import DualStreamUNet
from diffdis.models.patch_autoencoder import PatchAutoencoder
from diffdis.pipelines import load_pipeline
from diffdis.pipelines.clip_pipeline import ClipZeroShotPipeline
from diffdis.pipelines.zeroshot_pipeline import load_zero_shot_pipeline
from diffdis.train.build import Components, build_optimizer

CLIP = ["model.clip.patch_size=4", "model.clip.hidden_size=32", "model.clip.num_hidden_layers=1",
        "model.clip.num_attention_heads=2", "model.clip.intermediate_size=64"]
UNIDIFF = ["method=unidiff", "data.resolution=8"] + CLIP


def _built(overrides=(), patch: int = 2, context_dim: int = 32):
    """The method on tiny components: 8x8 pixels folded into 4x4x12 latents by a PatchAutoencoder (``patch=2``)."""
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    unet = tiny_unet(in_channels=3 * patch * patch, sample_size=8 // patch)
    if context_dim != 32:
        unet = type(unet).from_config({**unet.config, "cross_attention_dim": context_dim})
    unet = DualStreamUNet.from_unet(unet, text_dim=text.config.projection_dim)
    vae = PatchAutoencoder(patch) if patch > 1 else None
    components = Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000), vae)
    cfg = load_config(None, UNIDIFF + list(overrides))
    return methods.build(cfg, components), components, cfg


def _batch(tok, n: int = 4):
    """Half red, half blue 8x8 images in [-1, 1], their captions' ids and the empty prompt's."""
    red, blue = torch.tensor([0.9, -0.8, -0.8]), torch.tensor([-0.8, -0.8, 0.9])
    pixels = torch.stack([(red if i % 2 == 0 else blue).view(3, 1, 1).expand(3, 8, 8) for i in range(n)])
    captions = ["a red circle", "a blue circle"] * (n // 2)
    ids = tok(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    return pixels, ids, empty


def _has_grad(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("only", ["itc", "is", "rsc"])
def test_each_loss_trains_its_modules_and_a_zero_weight_removes_a_loss(only):
    weights = [f"unidiff.weight_{k}={1.0 if k == only else 0.0}" for k in ("itc", "is", "rsc")]
    method, components, _ = _built(weights)
    pixels, ids, empty = _batch(components.tokenizer)
    out = method(pixels, ids, empty, torch.Generator().manual_seed(0), gather=False)
    assert {k for k in out if k.startswith("loss_")} == {f"loss_{only}"} and set(method.loss_keys()) <= set(out)
    assert torch.isfinite(out["loss"]) and torch.equal(out["loss"], out[f"loss_{only}"])
    out["loss"].backward()
    clip, unet = method.clip, method.unet.unet
    reached = {
        "text tower": _has_grad(clip.text_model.encoder), "text projection": _has_grad(clip.text_projection),
        "vision tower": _has_grad(clip.vision_model),
        "unet encoder": _has_grad(unet.down_blocks) and _has_grad(unet.mid_block),
        "unet decoder": _has_grad(unet.up_blocks) and _has_grad(unet.conv_out), "rsc head": _has_grad(method.rsc_head),
    }
    expected = {
        "itc": {"text tower", "text projection", "vision tower"},
        "is": {"text tower", "unet encoder", "unet decoder"},
        "rsc": {"text tower", "vision tower", "unet encoder", "rsc head"},  # the mid block cross-attends to the caption
    }[only]
    assert {k for k, v in reached.items() if v} == expected
    assert all(p.grad is None and not p.requires_grad for p in method.unet.new_parameters())  # the frozen text stream
    assert all(p.grad is None for p in components.text_encoder.parameters())  # CLIP trains its own copy


def test_the_total_is_the_weighted_sum_and_the_unet_reads_clip_token_states():
    method, components, cfg = _built(["unidiff.weight_itc=0.5", "unidiff.weight_is=2", "unidiff.weight_rsc=0.25"])
    pixels, ids, empty = _batch(components.tokenizer)
    out = method(pixels, ids, empty, torch.Generator().manual_seed(0), gather=False)
    torch.testing.assert_close(out["loss"], 0.5 * out["loss_itc"] + 2 * out["loss_is"] + 0.25 * out["loss_rsc"])
    # IS is DiffDisMethod.generation_loss on the patch autoencoder's latents and CLIP's token states (same draws)
    only_is, _, _ = _built(["unidiff.weight_itc=0", "unidiff.weight_rsc=0"])
    only_is.load_state_dict(method.state_dict())
    ctx = method.clip.text_model(input_ids=torch.cat([ids, empty])).last_hidden_state  # (B + 1, L, d)
    latents = torch.nn.functional.pixel_unshuffle(pixels, 2)  # (B, 12, 4, 4)
    expected = method.generation_loss(latents, ctx[:4], ctx[4:], torch.Generator().manual_seed(0))
    got = only_is(pixels, ids, empty, torch.Generator().manual_seed(0), gather=False)["loss_is"]
    torch.testing.assert_close(got, expected)
    optimizer = build_optimizer(cfg, method)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in method.parameters() if p.requires_grad}
    assert not trained & {id(p) for p in method.unet.new_parameters()}
    assert not trained & {id(p) for p in components.text_encoder.parameters()}  # CLIP trains a copy of it


def test_unidiff_config_errors():
    with pytest.raises(ConfigError, match="cross_attention_dim=48 must be the CLIP text width 32"):
        _built(context_dim=48)
    with pytest.raises(ConfigError, match="latent cache"):
        _built(["data.cache_dir=/tmp/nowhere"])
    with pytest.raises(ConfigError, match="not all 0"):
        load_config(None, ["method=unidiff", "unidiff.weight_itc=0", "unidiff.weight_is=0", "unidiff.weight_rsc=0"])
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(None, ["method=unidiff", "unidiff.weight_rsc=-1"])


def test_unidiff_saves_both_pipelines_that_load_and_match_the_live_model(tmp_path):
    method, components, cfg = _built()
    method.eval()
    method.save_pretrained(tmp_path, components, cfg)
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "zeroshot_index.json").is_file()
    assert applicable(tmp_path) == {"method": "unidiff", "generates": True, "discriminates": True, "classifier": "diffdis",
                                     "trained_on": None}  # no diffdis_config.yaml: not written by the trainer
    # text to image: the UNet conditioned on CLIP's text tower
    pipe = load_pipeline(tmp_path, "ddim")
    live = method.text_to_image_pipeline(components, pipe.scheduler)
    assert live.text_encoder.text_model is method.clip.text_model  # shared, not copied: evaluation sees the live weights
    torch.testing.assert_close(pipe.text_encoder.state_dict(), live.text_encoder.state_dict())
    sample = dict(num_inference_steps=2, output_type="pt", guidance_scale=2.0)
    images = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **sample).images  # (1, 3, 8, 8)
    assert images.shape == (1, 3, 8, 8)
    torch.testing.assert_close(images, live(["a red circle"], generator=torch.Generator().manual_seed(0), **sample).images)
    # zero-shot and retrieval: CLIP
    zs = load_zero_shot_pipeline(tmp_path)
    assert isinstance(zs, ClipZeroShotPipeline) and zs.config.generates and zs.resolution == 8
    pixels, _, _ = _batch(components.tokenizer)
    live_zs = method.zero_shot_pipeline(components, cfg)
    torch.testing.assert_close(zs.encode_images(pixels), live_zs.encode_images(pixels))
    torch.testing.assert_close(zs.encode_text(["a red circle"]), live_zs.encode_text(["a red circle"]))


@pytest.mark.slow
def test_unidiff_trains_in_two_processes_resumes_and_is_evaluated(tmp_path, tiny_overrides, monkeypatch):
    from diffdis.cli import evaluate

    out = tmp_path / "unidiff"
    args = tiny_overrides + UNIDIFF[:1] + CLIP + [f"train.output_dir={out}", "train.report_to=none",
                                                  "train.checkpointing_steps=2", "train.validation_every=2"]
    accelerate(args + ["train.max_steps=2"], num_processes=2)
    accelerate(args + ["train.max_steps=4", "train.resume_from_checkpoint=latest"], num_processes=2)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["replica_param_checksums"][0] == summary["replica_param_checksums"][1]
    for name in ("clip", "unet", "rsc_head"):
        assert (out / "checkpoint-2" / name / "config.json").is_file()
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    for key in ("loss_itc", "loss_is", "loss_rsc"):
        assert any(f"train/{key}" in r for r in rows) and any(f"val/{key}" in r for r in rows)
    assert max(r["step"] for r in rows if "train/loss" in r) == 4
    index = json.loads((out / "model" / "zeroshot_index.json").read_text())
    assert index["_class_name"] == "ClipZeroShotPipeline" and index["method"] == "unidiff" and index["generates"]
    monkeypatch.setenv("DIFFDIS_CACHE", str(tmp_path / "cache"))
    small = ["--fid-images", "8", "--adherence-per-combo", "1", "--zeroshot-samples", "8", "--retrieval-samples", "8",
             "--steps", "2", "--batch-size", "16", "--reference-steps", "20", "--device", "cpu"]
    assert evaluate.main([str(out / "model"), "--out", str(tmp_path / "eval")] + small) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert {"fid", "adherence/shape", "shape/acc1", "retrieval/image_retrieval_recall@1"} <= set(metrics)
