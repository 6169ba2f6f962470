"""method=prior: a diffusion prior that generates CLIP image embeddings from captions (training, saving, seeded
generation, how well it generates, config errors, the evaluation tools' refusal, and a two-process run)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from helpers_train import accelerate
from helpers_tiny import tiny_text_encoder, tiny_unet

import diffdis.methods as methods
from diffdis.config import ConfigError, load_config
from diffdis.data.embedded import make_embedded_dataset
from diffdis.data.transforms import to_pixel_values, tokenize
from diffdis.models import DualStreamUNet
from diffdis.models.components import train_tokenizer
from diffdis.models.prior import DiffusionPrior
from diffdis.pipelines.prior_pipeline import DiffusionPriorPipeline, generate_image_embeddings, load_prior_pipeline
from diffdis.train.build import Components, build_optimizer

SIDE = 8
CLIP = ["method=clip", f"data.resolution={SIDE}", "model.clip.patch_size=4", "model.clip.hidden_size=32",
        "model.clip.num_hidden_layers=1", "model.clip.num_attention_heads=2", "model.clip.intermediate_size=64",
        "train.learning_rate=2e-3"]
PRIOR = [f"data.resolution={SIDE}", "model.prior.hidden_size=64", "model.prior.intermediate_size=128",
         "model.prior.steps=10", "train.learning_rate=1e-3"]


class Shapes:
    """Embedded train images (pixels in [-1, 1]) with every caption phrasing, and seeded batches of them."""

    def __init__(self, split: str, n: int):
        data = make_embedded_dataset(split, n, resolution=SIDE)
        self.pixels = torch.stack([to_pixel_values(im) for im in data["image"]])  # (N, 3, R, R)
        self.captions = list(data["captions"])  # N lists of phrasings
        self.caption = list(data["caption"])  # one phrasing each

    def batch(self, tokenizer, generator: torch.Generator, n: int = 32):
        idx = torch.randint(0, len(self.pixels), (n,), generator=generator).tolist()
        caps = [self.captions[i][int(torch.randint(len(self.captions[i]), (1,), generator=generator))] for i in idx]
        return self.pixels[idx], tokenize(tokenizer, caps)


def _components(tokenizer) -> Components:
    text = tiny_text_encoder(tokenizer, with_projection=True)
    return Components(tokenizer, text, None, DDPMScheduler(num_train_timesteps=1000))


def _train(method, cfg, data: Shapes, tokenizer, steps: int, seed: int = 0) -> list:
    optimizer = build_optimizer(cfg, method)
    generator, losses = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        pixels, ids = data.batch(tokenizer, generator)
        out = method(pixels, ids, ids[:1], generator, gather=False)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    return losses


@pytest.fixture(scope="module")
def shapes():
    return Shapes("train", 96)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, shapes):
    """A CLIP model folder (method=clip, 8x8 pixels) trained briefly on the embedded shapes."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = train_tokenizer([c for caps in shapes.captions for c in caps], 128, 16)
    components = _components(tokenizer)
    cfg = load_config(None, CLIP)
    clip = methods.build(cfg, components)
    _train(clip, cfg, shapes, tokenizer, steps=80)
    clip.save_pretrained(folder, components, cfg)
    return folder


def _prior(clip_dir, extra=()):
    cfg = load_config(None, ["method=prior", f"model.prior.clip={clip_dir}", *PRIOR, *extra])
    components = _components(train_tokenizer(["a red circle"], 16, 16))  # replaced by the CLIP model's tokenizer
    return methods.build(cfg, components), components, cfg


def test_prior_generates_its_captions_image_embeddings_better_than_the_baselines(clip_dir, shapes):
    """After 200 steps, generated embeddings of held-out captions are closer to their images' true CLIP embeddings
    than to other images' (shuffled pairs) and than the mean training embedding (the best caption-blind guess)."""
    torch.manual_seed(0)
    method, components, cfg = _prior(clip_dir)
    assert not method.generates and not method.discriminates and method.input_space == "pixels"
    losses = _train(method, cfg, shapes, components.tokenizer, steps=200)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20]), (losses[:3], losses[-3:])
    held_out = Shapes("validation", 48)
    pipe = method.prior_pipeline()
    true = pipe.clip_pipeline().encode_images(held_out.pixels)  # (N, d)
    made = generate_image_embeddings(pipe, held_out.caption, generator=torch.Generator().manual_seed(0))  # (N, d)
    paired = (made * true).sum(-1).mean().item()
    shuffled = (made * true.roll(1, dims=0)).sum(-1).mean().item()
    mean_guess = (F.normalize(pipe.clip_pipeline().encode_images(shapes.pixels).mean(0), dim=-1) * true).sum(-1).mean().item()
    print(f"cosine with the true embedding: generated {paired:.3f}, shuffled {shuffled:.3f}, mean embedding {mean_guess:.3f}")
    assert paired > shuffled and paired > mean_guess


def test_prior_saves_loads_and_generates_seeded(clip_dir, shapes, tmp_path):
    method, components, cfg = _prior(clip_dir, ["model.prior.guidance=3.0"])
    _train(method, cfg, shapes, components.tokenizer, steps=2)
    method.save_pretrained(tmp_path, components, cfg)
    assert (tmp_path / "prior_index.json").is_file() and (tmp_path / "prior" / "config.json").is_file()
    assert not (tmp_path / "zeroshot_index.json").exists() and not (tmp_path / "model_index.json").exists()
    loaded = DiffusionPrior.from_pretrained(tmp_path / "prior")
    for (name, saved), live in zip(loaded.state_dict().items(), method.prior.state_dict().values()):
        torch.testing.assert_close(saved, live, msg=name)
    pipe = load_prior_pipeline(tmp_path)
    assert isinstance(pipe, DiffusionPriorPipeline) and pipe.config.guidance_scale == 3.0 and pipe.resolution == SIDE
    captions = ["a red circle", "a large blue square on the left", "a green ring"]
    first = generate_image_embeddings(tmp_path, captions, generator=torch.Generator().manual_seed(7))
    assert first.shape == (3, pipe.embedding_dim)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(first, generate_image_embeddings(pipe, captions, generator=torch.Generator().manual_seed(7)))
    ids = tokenize(pipe.tokenizer, captions)
    torch.testing.assert_close(first, generate_image_embeddings(pipe, input_ids=ids, generator=torch.Generator().manual_seed(7)))
    assert not torch.allclose(first, generate_image_embeddings(pipe, captions, generator=torch.Generator().manual_seed(8)))
    live = generate_image_embeddings(method.prior_pipeline(), captions, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, live)
    with pytest.raises(ValueError, match="does not generate images"):
        method.text_to_image_pipeline(components)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_prior_config_errors_are_one_line(clip_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs model.prior.clip") as err:
        _prior("")
    _one_line(err)
    with pytest.raises(ConfigError, match="model.prior.clip: model folder .* does not exist") as err:
        _prior(tmp_path / "nowhere")
    _one_line(err)
    with pytest.raises(ConfigError, match="trained at 8 px") as err:
        _prior(clip_dir, ["data.resolution=16"])
    _one_line(err)
    with pytest.raises(ConfigError, match="p_uncond"):
        _prior(clip_dir, ["model.prior.p_uncond=1.0"])
    diffdis_dir = tmp_path / "diffdis"  # a folder of another kind: a DiffDis model
    tok = train_tokenizer(["a red circle"], 16, 16)
    text = tiny_text_encoder(tok, with_projection=True)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim)
    components = Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000))
    cfg = load_config(None, [f"data.resolution={SIDE}"])
    methods.build(cfg, components).save_pretrained(diffdis_dir, components, cfg)
    with pytest.raises(ConfigError, match="holds a DiffDisZeroShotPipeline .* not a CLIP model") as err:
        _prior(diffdis_dir)
    _one_line(err)
    prior, components, cfg = _prior(clip_dir)
    prior.save_pretrained(tmp_path / "prior", components, cfg)
    with pytest.raises(ConfigError, match="is a prior folder, not a CLIP model") as err:
        _prior(tmp_path / "prior")
    _one_line(err)


def test_the_evaluation_tools_refuse_a_prior_folder_in_one_line(clip_dir, tmp_path, capsys):
    from diffdis.cli import evaluate, sample, zeroshot
    from diffdis.eval.api import EvaluationError, applicable
    from diffdis.pipelines.zeroshot import ZeroShotModelError
    from diffdis.pipelines.zeroshot_pipeline import load_zero_shot_pipeline

    prior, components, cfg = _prior(clip_dir)
    prior.save_pretrained(tmp_path / "prior", components, cfg)
    with pytest.raises(EvaluationError, match="is a diffusion prior"):
        applicable(tmp_path / "prior")
    with pytest.raises(ZeroShotModelError, match="is a diffusion prior"):
        load_zero_shot_pipeline(tmp_path / "prior")
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "prior"), "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing to evaluate" in err and err.count("\n") == 1, err
    assert zeroshot.main([str(tmp_path / "prior"), "--device", "cpu", "--out", str(tmp_path / "zs")]) == 2
    assert "is a diffusion prior" in capsys.readouterr().err
    assert sample.main([str(tmp_path / "prior"), "--prompt", "a red circle", "--out", str(tmp_path / "s")]) == 2
    assert "is a diffusion prior" in capsys.readouterr().err
    with pytest.raises(ZeroShotModelError, match="not a prior folder .*method 'clip'"):
        load_prior_pipeline(clip_dir)


@pytest.mark.slow
def test_prior_trains_in_two_processes_and_resumes(tmp_path, tiny_overrides):
    clip_run, out = tmp_path / "clip", tmp_path / "prior"
    small_clip = ["model.clip.hidden_size=32", "model.clip.num_hidden_layers=1", "model.clip.num_attention_heads=2",
                  "model.clip.intermediate_size=64"]
    accelerate(tiny_overrides + ["method=clip", *small_clip, f"train.output_dir={clip_run}", "train.max_steps=2",
                                 "train.report_to=none"])
    args = tiny_overrides + ["method=prior", f"model.prior.clip={clip_run / 'model'}", "model.prior.hidden_size=32",
                             "model.prior.intermediate_size=64", f"train.output_dir={out}", "train.report_to=none",
                             "train.checkpointing_steps=2", "train.validation_every=2", "train.eval_every=2"]
    accelerate(args + ["train.max_steps=2"], num_processes=2)
    accelerate(args + ["train.max_steps=4", "train.resume_from_checkpoint=latest"], num_processes=2)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["replica_param_checksums"][0] == summary["replica_param_checksums"][1]
    assert (out / "checkpoint-2" / "prior" / "config.json").is_file()
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert {"train/loss", "train/cosine", "val/loss", "val/cosine"} <= logged
    assert not any(k.startswith("eval/") and k not in ("eval/seconds", "eval/train_seconds") for k in logged)  # nothing to score
    made = generate_image_embeddings(out / "model", ["a red circle"], generator=torch.Generator().manual_seed(0))
    assert made.shape == (1, 16)  # the CLIP model's projection width (model.text_encoder.projection_dim)
