"""method=rleg: CLIP training with generated embeddings as extra positives: the discrimination stream's text
embeddings of the images, a diffusion prior's image embeddings of the captions, or both."""

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
from diffdis.pipelines.prior_pipeline import load_prior_pipeline
from diffdis.train.build import Components, build_optimizer

SMALL = ["data.resolution=8", "model.clip.patch_size=4", "model.clip.hidden_size=32", "model.clip.num_hidden_layers=1",
         "model.clip.num_attention_heads=2", "model.clip.intermediate_size=64"]


def _components(seed: int = 0) -> Components:
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim)
    with torch.no_grad():  # the text stream's output layer is zero at init: every generated embedding would be equal
        for p in unet.new_parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    """A diffdis model folder (8x8 pixels) whose discrimination stream generates the extra positives."""
    folder = tmp_path_factory.mktemp("generator")
    cfg = load_config(None, ["data.resolution=8", "zeroshot.steps=2"])
    components = _components()
    methods.build(cfg, components).save_pretrained(folder, components, cfg)
    return folder


def _rleg(generator_dir, extra=()):
    cfg = load_config(None, ["method=rleg", f"model.rleg.generator={generator_dir}", *SMALL, *extra])
    components = _components(seed=1)
    return methods.build(cfg, components), components


def _batch(tok, n: int = 4):
    pixels = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ids = tok(["a red circle", "a blue square"] * (n // 2), padding="max_length", max_length=16, return_tensors="pt").input_ids
    return pixels, ids


def test_generated_embeddings_are_extra_positives(generator_dir):
    method, components = _rleg(generator_dir)
    gen = method.generator
    assert components.tokenizer is gen.tokenizer  # the text tower's vocabulary is the generator's
    pixels, ids = _batch(components.tokenizer)
    torch.testing.assert_close(method.clip.get_text_features(input_ids=ids).pooler_output, gen.text_encoder(input_ids=ids).text_embeds)
    made = method.generated(pixels, torch.Generator().manual_seed(5))
    torch.testing.assert_close(made, method.generated(pixels, torch.Generator().manual_seed(5)))  # seeded: resumable
    assert made.shape == (4, gen.unet.config.text_dim) and not torch.allclose(made[0], made[1])
    out = method(pixels, ids, ids[:1], torch.Generator().manual_seed(5), gather=False)
    assert out["loss"].item() == pytest.approx(out["loss_itc"].item() + 0.5 * out["loss_gen"].item(), rel=1e-5)
    out["loss"].backward()
    assert method.clip.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.unet.parameters()), "the generator is frozen"
    assert not any(n.startswith("generator") for n, _ in method.named_parameters())  # neither trained nor checkpointed


def test_generation_steps_default_to_one_and_null_reads_the_generator(generator_dir, monkeypatch):
    """model.rleg.steps: 1 by default, whatever K the generator was saved with (2 here); null takes the saved K."""
    pixels, _ = _batch(_components().tokenizer)
    for extra, expected in (((), 1), (["model.rleg.steps=null"], None), (["model.rleg.steps=3"], 3)):
        method, _ = _rleg(generator_dir, extra)
        seen = []
        original = method.generator.encode_images
        monkeypatch.setattr(method.generator, "encode_images",
                            lambda *a, **k: seen.append(k["num_inference_steps"]) or original(*a, **k))
        method.generated(pixels, torch.Generator().manual_seed(5))
        assert seen == [expected], extra
    saved, _ = _rleg(generator_dir, ["model.rleg.steps=null"])
    one, _ = _rleg(generator_dir)
    a = saved.generated(pixels, torch.Generator().manual_seed(5))  # the saved K = 2
    b = one.generated(pixels, torch.Generator().manual_seed(5))
    assert not torch.allclose(a, b), "K = 1 and the generator's saved K = 2 give the same embeddings"


def test_weight_zero_is_the_clip_loss(generator_dir):
    method, components = _rleg(generator_dir, ["model.rleg.weight=0"])
    pixels, ids = _batch(components.tokenizer)
    out = method(pixels, ids, ids[:1], torch.Generator().manual_seed(5), gather=False)
    assert out["loss"].item() == pytest.approx(out["loss_itc"].item())


def test_bad_generators_are_one_line_errors(generator_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs model.rleg.generator .* or model.rleg.prior"):
        methods.build(load_config(None, ["method=rleg", *SMALL]), _components())
    with pytest.raises(ConfigError, match="model.rleg.generator"):
        _rleg(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="trained at 8 px"):
        _rleg(generator_dir, ["data.resolution=16"])
    clip_dir = tmp_path / "clip"
    clip, components = _rleg(generator_dir)
    cfg = load_config(None, ["method=clip", *SMALL])
    clip.save_pretrained(clip_dir, components, cfg)
    with pytest.raises(ConfigError, match="no trained discrimination stream"):
        _rleg(clip_dir)


@pytest.mark.slow
def test_rleg_trains_on_a_trained_generator_and_is_evaluated(tmp_path, tiny_overrides):
    from diffdis.cli import zeroshot

    gen_run, out = tmp_path / "gen", tmp_path / "rleg"
    accelerate(tiny_overrides + [f"train.output_dir={gen_run}", "train.max_steps=2", "train.report_to=none", "zeroshot.steps=2"])
    accelerate(tiny_overrides + ["method=rleg", f"model.rleg.generator={gen_run / 'model'}", "model.clip.hidden_size=32",
                                 "model.clip.num_hidden_layers=1", "model.clip.num_attention_heads=2",
                                 "model.clip.intermediate_size=64", f"train.output_dir={out}", "train.max_steps=2",
                                 "train.report_to=none", "train.validation_every=2"], num_processes=2)
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert any("train/loss_gen" in r for r in rows)
    index = json.loads((out / "model" / "zeroshot_index.json").read_text())
    assert index["_class_name"] == "ClipZeroShotPipeline" and index["method"] == "rleg"
    assert zeroshot.main([str(out / "model"), "--task", "shape", "--num-samples", "8", "--device", "cpu",
                          "--out", str(tmp_path / "zs")]) == 0


# ---------------------------------------------------------------------------- the text->image generator: a prior
def save_prior(folder, resolution: int = 8, projection_dim: int = 32, seed: int = 3):
    """A prior folder over a CLIP model (``resolution`` px, ``projection_dim`` wide, the tiny tokenizer) whose
    output layer is perturbed (a new prior predicts 0: every generated embedding would be equal)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    config = tiny_text_encoder(tok, with_projection=True).config
    config.projection_dim = projection_dim
    components = Components(tok, CLIPTextModelWithProjection(config), None, DDPMScheduler(num_train_timesteps=1000))
    small = [f"data.resolution={resolution}", *SMALL[1:]]
    cfg = load_config(None, ["method=clip", *small])
    methods.build(cfg, components).save_pretrained(folder / "clip", components, cfg)
    cfg = load_config(None, ["method=prior", f"model.prior.clip={folder / 'clip'}", "model.prior.hidden_size=32",
                             "model.prior.intermediate_size=64", "model.prior.steps=3", *small])
    prior = methods.build(cfg, components)
    with torch.no_grad():
        prior.prior.proj_out.weight.add_(0.2 * torch.randn(prior.prior.proj_out.weight.shape))
    prior.save_pretrained(folder / "prior", components, cfg)
    return folder / "prior"


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    return save_prior(tmp_path_factory.mktemp("prior"))


def test_a_prior_starts_the_clip_model_and_adds_generated_image_embeddings(generator_dir, prior_dir):
    method, components = _rleg(generator_dir, [f"model.rleg.prior={prior_dir}", "model.rleg.prior_weight=0.25"])
    prior = method.prior
    assert components.tokenizer is prior.tokenizer  # the captions are read as the prior's CLIP model reads them
    assert method.loss_keys() == ["loss", "loss_itc", "loss_gen", "loss_prior", "acc_i2t", "acc_t2i"]
    pixels, ids = _batch(components.tokenizer)
    # the trained CLIP model starts as the prior's: generated image embeddings and caption features in one space
    torch.testing.assert_close(method.clip.get_text_features(input_ids=ids).pooler_output,
                               prior.clip.get_text_features(input_ids=ids).pooler_output)
    made = method.generated_images(ids, torch.Generator().manual_seed(5))
    torch.testing.assert_close(made, method.generated_images(ids, torch.Generator().manual_seed(5)))  # seeded: resumable
    assert made.shape == (4, 32) and not torch.allclose(made[0], made[1])
    cfg = load_config(None, ["method=rleg", f"model.rleg.generator={generator_dir}", f"model.rleg.prior={prior_dir}", *SMALL])
    optimizer = build_optimizer(cfg, method)
    for step in range(2):
        out = method(pixels, ids, ids[:1], torch.Generator().manual_seed(step), gather=False)
        total = out["loss_itc"] + 0.5 * out["loss_gen"] + 0.25 * out["loss_prior"]
        assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
        optimizer.zero_grad()
        out["loss"].backward()
        assert method.clip.text_projection.weight.grad.abs().sum() > 0
        optimizer.step()
    assert all(p.grad is None for p in prior.prior.parameters()) and all(p.grad is None for p in prior.clip.parameters())
    assert not any(n.startswith(("prior", "generator")) for n, _ in method.named_parameters())
    assert not torch.equal(method.clip.text_projection.weight, prior.clip.text_projection.weight)  # a copy trains


def test_a_prior_alone_is_enough(prior_dir):
    method, components = _rleg("", [f"model.rleg.prior={prior_dir}"])
    assert method.generator is None and method.loss_keys() == ["loss", "loss_itc", "loss_prior", "acc_i2t", "acc_t2i"]
    pixels, ids = _batch(components.tokenizer)
    out = method(pixels, ids, ids[:1], torch.Generator().manual_seed(5), gather=False)
    assert "loss_gen" not in out and out["loss"].item() == pytest.approx((out["loss_itc"] + 0.5 * out["loss_prior"]).item())


def test_bad_priors_are_one_line_errors(generator_dir, prior_dir, tmp_path):
    def error(extra, match):
        with pytest.raises(ConfigError, match=match) as err:
            _rleg(generator_dir, extra)
        assert "\n" not in str(err.value)

    error([f"model.rleg.prior={tmp_path / 'nowhere'}"], "model.rleg.prior: model folder .* does not exist")
    error([f"model.rleg.prior={generator_dir}"], "model.rleg.prior: .* is not a prior folder .*method 'diffdis'")
    error([f"model.rleg.prior={prior_dir}", "data.resolution=16"], "trained at 8 px")
    narrow = save_prior(tmp_path, projection_dim=16)
    assert load_prior_pipeline(narrow).embedding_dim == 16
    error([f"model.rleg.prior={narrow}"], "generates 32-d text embeddings, model.rleg.prior's CLIP model embeds in 16")


@pytest.mark.slow
def test_rleg_trains_with_a_prior_from_the_command_line(tmp_path, tiny_overrides):
    prior = save_prior(tmp_path, resolution=16, projection_dim=16)
    out = tmp_path / "rleg"
    accelerate(tiny_overrides + ["method=rleg", f"model.rleg.prior={prior}", f"train.output_dir={out}", "train.max_steps=2",
                                 "train.report_to=none", "train.validation_every=2"])
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert {"train/loss_prior", "val/loss_prior"} <= logged and "train/loss_gen" not in logged
    index = json.loads((out / "model" / "zeroshot_index.json").read_text())
    assert index["_class_name"] == "ClipZeroShotPipeline" and index["method"] == "rleg"
    saved = json.loads((out / "model" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert saved == json.loads((prior / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
