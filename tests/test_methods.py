"""The method seam: the registry, each method's losses and what it trains, and every method trained from the
command line in two processes."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from helpers_train import accelerate
from helpers_tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet

import diffdis.methods as methods
from diffdis.config import ConfigError, load_config
from diffdis.models import DualStreamUNet
from diffdis.train.build import Components


def test_registry_lists_the_methods_and_refuses_others():
    assert methods.available() == ["clip", "diffdis", "disc_only", "gen_only", "oner", "prior", "rleg", "unidiff"]
    assert methods.get("gen_only") is methods.GenOnlyMethod and methods.get("unidiff") is methods.UniDiffMethod
    with pytest.raises(ValueError, match="not one of"):
        methods.get("nope")
    with pytest.raises(ConfigError, match="method='nope'"):
        load_config(None, ["method=nope"])


def _built(name: str):
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim)
    components = Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000))
    return methods.build(load_config(None, [f"method={name}"]), components), tok


def _step(method, tok, n: int = 8):
    size, channels = method.unet.config.sample_size, method.unet.config.in_channels
    latents = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))
    ids = tok(["a red circle", "a blue square"] * (n // 2), padding="max_length", max_length=16, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    losses = method(latents, ids, empty, torch.Generator().manual_seed(1), gather=False)
    losses["loss"].backward()
    return losses


@pytest.mark.parametrize("name, keys, generates, discriminates", [
    ("diffdis", {"loss", "loss_ig", "loss_ita", "acc_i2t", "acc_t2i", "logit_scale"}, True, True),
    ("gen_only", {"loss", "loss_ig"}, True, False),
    ("disc_only", {"loss", "loss_ita", "acc_i2t", "acc_t2i", "logit_scale"}, False, True),
])
def test_each_method_returns_its_losses_and_trains_its_streams(name, keys, generates, discriminates):
    method, tok = _built(name)
    assert (method.generates, method.discriminates) == (generates, discriminates)
    losses = _step(method, tok)
    assert set(losses) == keys and torch.isfinite(losses["loss"])
    assert set(method.loss_keys()) <= keys
    text_head = method.unet.text_head.weight  # the discrimination stream's output
    image_head = method.unet.unet.conv_out.weight  # the generation stream's output
    assert (text_head.grad is not None and text_head.grad.abs().sum() > 0) == discriminates
    assert text_head.requires_grad == discriminates  # gen_only freezes the text stream
    assert (image_head.grad is not None and image_head.grad.abs().sum() > 0) == generates


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gen_only", "disc_only"])
def test_method_trains_from_the_command_line_in_two_processes(tmp_path, tiny_overrides, name):
    out = tmp_path / name
    accelerate(tiny_overrides + [f"method={name}", f"train.output_dir={out}", "train.max_steps=3", "train.checkpointing_steps=0",
                                   "train.validation_every=3"], num_processes=2)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 3
    assert summary["replica_param_checksums"][0] == summary["replica_param_checksums"][1]
    saved = (out / "model" / "diffdis_config.yaml").read_text()
    assert f"method: {name}" in saved
    index = json.loads((out / "model" / "zeroshot_index.json").read_text())  # what inference reads
    assert index["method"] == name and index["generates"] == (name == "gen_only")
    assert index["classifier"] == ("diffusion_classifier" if name == "gen_only" else "text_query")
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert ("train/loss_ita" in logged) == (name == "disc_only") and ("train/loss_ig" in logged) == (name == "gen_only")
    assert "val/loss" in logged


def test_discrimination_pass_without_image_gradient_trains_in_two_processes(tmp_path, tiny_overrides):
    """DDP with loss.ita_image_grad=false: every parameter still gets a gradient each step (no unused-parameter
    error), and both replicas end with the same weights."""
    out = tmp_path / "nograd"
    accelerate(tiny_overrides + ["model.fusion=one_way", "loss.ita_image_grad=false", f"train.output_dir={out}",
                                 "train.max_steps=3", "train.checkpointing_steps=0", "train.validation_every=0"], num_processes=2)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 3
    assert summary["replica_param_checksums"][0] == summary["replica_param_checksums"][1]
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert all(r["train/loss_ita"] > 0 for r in rows if "train/loss_ita" in r) and any("train/loss_ita" in r for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gen_only", "disc_only"])
def test_method_models_are_evaluated_on_what_they_train(tmp_path, monkeypatch, tiny_overrides, name):
    """gen_only: FID, adherence and zero-shot by the diffusion classifier, no retrieval; disc_only: zero-shot by text
    queries and retrieval, no FID nor adherence (its generation head was never trained)."""
    from diffdis.cli import evaluate, train, zeroshot

    monkeypatch.setenv("DIFFDIS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert train.main(tiny_overrides + [f"method={name}", f"train.output_dir={out}", "train.max_steps=2",
                                        "train.report_to=none"]) == 0
    small = ["--fid-images", "8", "--adherence-per-combo", "1", "--zeroshot-samples", "4", "--retrieval-samples", "4",
             "--steps", "2", "--zs-steps", "2", "--dc-timesteps", "2", "--batch-size", "16", "--reference-steps", "20",
             "--device", "cpu"]
    adaptive = ["--dc-keep", "2", "--dc-first-timesteps", "1"]  # the two-round diffusion classifier (gen_only)
    assert evaluate.main([str(out / "model"), "--out", str(tmp_path / "eval")] + small + adaptive) == 0
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (written["settings"]["zeroshot"]["dc_keep"], written["settings"]["zeroshot"]["dc_first_timesteps"]) == (2, 1)
    metrics = written["metrics"]
    assert "shape/acc1" in metrics
    assert ("fid" in metrics and "adherence/shape" in metrics) == (name == "gen_only")
    assert ("retrieval/image_retrieval_recall@1" in metrics) == (name == "disc_only")
    assert zeroshot.main([str(out / "model"), "--task", "colour", "--num-samples", "4", "--steps", "2", "--dc-timesteps", "2",
                          "--device", "cpu", "--out", str(tmp_path / "zs")]) == 0
    settings = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert settings["method"] == ("diffusion_classifier" if name == "gen_only" else "diffdis")


def test_loss_settings_that_shape_the_text_stream_are_read():
    """loss.logit_scale_init sets a new text stream's initial scale; γ (loss.text_scale) may exceed 1."""
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim)
    components = Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000))
    method = methods.build(load_config(None, ["loss.logit_scale_init=5.0", "loss.text_scale=4.0"]), components)
    assert method.unet.logit_scale.exp().item() == pytest.approx(5.0)
    assert method.options.text_scale == 4.0
    with pytest.raises(ConfigError, match="text_scale"):
        load_config(None, ["loss.text_scale=0"])


def test_discrimination_pass_without_image_gradient_gives_the_same_loss_and_spares_the_image_side():
    """loss.ita_image_grad=false: the same L_ITA and text-stream gradient as the full pass, no gradient into the
    UNet's image-only layers; the config refuses it with joint fusion and with disc_only."""
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim, fusion="one_way")
    components = Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000))
    results = {}
    for grad in (True, False):
        cfg = load_config(None, ["model.fusion=one_way", f"loss.ita_image_grad={str(grad).lower()}"])
        method = methods.build(cfg, components)
        method.zero_grad(set_to_none=True)
        size, channels = unet.config.sample_size, unet.config.in_channels
        latents = torch.randn(8, channels, size, size, generator=torch.Generator().manual_seed(0))
        ids = tok(["a red circle", "a blue square"] * 4, padding="max_length", max_length=16, return_tensors="pt").input_ids
        encoded = method.text_encoder(ids)
        ctx, query = encoded.last_hidden_state, encoded.text_embeds  # (8, L, d), (8, d_e)
        # any (1, L, d) context serves here; training passes the empty prompt's
        ita = method.discrimination_loss(latents, query, ctx[:1], torch.Generator().manual_seed(1), gather=False)
        ita["loss"].backward()
        conv = unet.unet.down_blocks[0].resnets[0].conv1.weight.grad  # image side only
        results[grad] = (ita["loss"].detach(), unet.text_head.weight.grad.clone(), unet.fusion_blocks[0].fc_in.weight.grad.clone(),
                         conv is not None and conv.abs().sum().item() > 0)
    torch.testing.assert_close(results[False][0], results[True][0])
    torch.testing.assert_close(results[False][1], results[True][1])
    torch.testing.assert_close(results[False][2], results[True][2])
    assert results[True][3] and not results[False][3]
    with pytest.raises(ConfigError, match="needs model.fusion=one_way"):
        load_config(None, ["loss.ita_image_grad=false"])
    with pytest.raises(ConfigError, match="disc_only"):
        load_config(None, ["method=disc_only", "model.fusion=one_way", "loss.ita_image_grad=false"])
