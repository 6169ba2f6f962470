"""method=oner: one shared transformer for images and captions (its loss, weight sharing, saving, zero-shot, evaluation)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from helpers_train import train_two_processes_resume_and_evaluate
from helpers_tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet

import diffdis.methods as methods
from diffdis.config import ConfigError, load_config
from diffdis.models import DualStreamUNet
from diffdis.pipelines.oner_pipeline import OneRZeroShotPipeline
from diffdis.pipelines.zeroshot_pipeline import load_zero_shot_pipeline
from diffdis.train.build import Components, build_optimizer

ONER = ["method=oner", "data.resolution=8", "model.oner.patch_size=4", "model.oner.hidden_size=32",
        "model.oner.num_hidden_layers=2", "model.oner.num_attention_heads=2", "model.oner.intermediate_size=64",
        "model.text_encoder.projection_dim=16"]


def _built(overrides=()):
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim)
    components = Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000))
    cfg = load_config(None, ONER + list(overrides))
    return methods.build(cfg, components), components, cfg


def _colour_batch(tok, n: int = 8):
    """Half red, half blue 8x8 images in [-1, 1] and their captions' ids."""
    red, blue = torch.tensor([0.9, -0.8, -0.8]), torch.tensor([-0.8, -0.8, 0.9])
    pixels = torch.stack([(red if i % 2 == 0 else blue).view(3, 1, 1).expand(3, 8, 8) for i in range(n)])
    ids = tok(["a red circle", "a blue circle"] * (n // 2), padding="max_length", max_length=16, return_tensors="pt").input_ids
    return pixels, ids


def test_oner_learns_to_match_images_and_captions():
    torch.manual_seed(0)
    method, components, cfg = _built(["train.learning_rate=3e-3"])
    assert method.input_space == "pixels" and not method.generates and method.discriminates
    assert not any(p.requires_grad for p in components.text_encoder.parameters())  # the run's text tower is unused
    optimizer = build_optimizer(cfg, method)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(method.tower.parameters()))
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


def test_oner_has_one_transformer_for_both_modalities():
    method, components, cfg = _built()
    tower, w, m, layers = method.tower, 32, 64, 2
    # one tower: per layer attention (4 w^2 + 4 w), MLP (2 w m + m + w) and two norms (4 w), plus a final norm
    transformer = layers * (4 * w * w + 4 * w + 2 * w * m + m + w + 4 * w) + 2 * w
    vocab, patches, length = len(components.tokenizer), (8 // 4) ** 2, 16
    embeddings = 3 * 16 * w + w + vocab * w + 2 * w + w  # patches (conv), tokens, modalities, [CLS]
    positions = (1 + patches) * w + (1 + length) * w
    projection, logit_scale = w * 16, 1
    assert sum(p.numel() for p in tower.parameters()) == transformer + embeddings + positions + projection + logit_scale
    shared = {name for name, _ in tower.named_parameters() if name.startswith(("layers.", "final_norm."))}
    assert len(shared) == layers * 12 + 2

    pixels, ids = _colour_batch(components.tokenizer, 4)

    def grads(loss):
        tower.zero_grad(set_to_none=True)
        loss.backward()
        return {name for name, p in tower.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    from_image = grads(tower.encode_image(pixels).pow(2).sum())
    from_text = grads(tower.encode_text(ids).pow(2).sum())
    # the same transformer weights (and the shared [CLS] token, modality table and projection) learn from both
    assert shared | {"cls_token", "modality_embedding.weight", "projection.weight"} <= from_image & from_text
    assert "token_embedding.weight" not in from_image and "patch_embedding.weight" not in from_text
    # changing one shared weight changes both embeddings
    before = tower.encode_image(pixels).detach(), tower.encode_text(ids).detach()
    with torch.no_grad():
        tower.layers[0].linear1.weight.add_(0.5 * torch.randn_like(tower.layers[0].linear1.weight))
    after = tower.encode_image(pixels), tower.encode_text(ids)
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_oner_ignores_padding_and_needs_its_modality_embedding():
    method, components, _ = _built()
    tower = method.tower.eval()
    short = components.tokenizer(["a red circle"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    long = components.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    torch.testing.assert_close(tower.encode_text(short), tower.encode_text(long))  # pad tokens are not attended to
    pixels, _ = _colour_batch(components.tokenizer, 2)
    before = tower.encode_image(pixels)
    with torch.no_grad():
        tower.modality_embedding.weight[0].add_(1.0)
    assert not torch.allclose(before, tower.encode_image(pixels))


def test_oner_gradient_checkpointing_keeps_the_loss_and_gradients():
    method, components, cfg = _built(["model.gradient_checkpointing=true"])
    pixels, ids = _colour_batch(components.tokenizer, 4)

    def loss_and_grads():
        method.zero_grad(set_to_none=True)
        loss = method(pixels, ids, ids[:1], torch.Generator(), gather=False)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in method.tower.layers.parameters()]

    plain = loss_and_grads()
    method.configure_speed(cfg)
    assert method.tower.gradient_checkpointing
    checkpointed = loss_and_grads()
    torch.testing.assert_close(checkpointed, plain)

def test_oner_config_errors():
    with pytest.raises(ConfigError, match="multiple of model.oner.patch_size"):
        _built(["model.oner.patch_size=3"])
    with pytest.raises(ConfigError, match="multiple of model.oner.num_attention_heads"):
        _built(["model.oner.num_attention_heads=3"])
    with pytest.raises(ConfigError, match="latent cache"):
        _built(["data.cache_dir=/tmp/nowhere"])
    with pytest.raises(ConfigError, match="model.oner.width"):
        load_config(None, ONER + ["model.oner.width=8"])
    method, _, _ = _built(["model.oner.projection_dim=8"])
    assert method.tower.config.projection_dim == 8


def test_oner_saves_a_zero_shot_pipeline_and_no_generator(tmp_path):
    method, components, cfg = _built()
    method.save_pretrained(tmp_path, components, cfg)
    assert (tmp_path / "zeroshot_index.json").is_file() and not (tmp_path / "model_index.json").exists()
    assert (tmp_path / "tower" / "config.json").is_file()
    pipe = load_zero_shot_pipeline(tmp_path)
    assert isinstance(pipe, OneRZeroShotPipeline) and pipe.resolution == 8 and pipe.discriminates
    live = method.zero_shot_pipeline(components, cfg)
    pixels, _ = _colour_batch(components.tokenizer, 4)
    torch.testing.assert_close(pipe.encode_images(pixels), live.encode_images(pixels))
    texts = ["a red circle", "a blue square"]
    torch.testing.assert_close(pipe.encode_text(texts), live.encode_text(texts))
    with pytest.raises(ValueError, match="does not generate"):
        method.text_to_image_pipeline(components)


@pytest.mark.slow
def test_oner_trains_in_two_processes_resumes_and_is_evaluated(tmp_path, tiny_overrides, monkeypatch):
    args = tiny_overrides + ONER[:1] + ONER[2:]
    train_two_processes_resume_and_evaluate(tmp_path / "oner", args, "tower", "OneRZeroShotPipeline", "oner", tmp_path, monkeypatch)
