"""Tests of DiffDisPipeline, export to vanilla diffusers, the sample command (diffdis.cli.sample) and the grid helper (tiny, CPU)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_tiny import (  # noqa: E402
    TinyCustomUNet,
    tiny_clip_tokenizer,
    tiny_components,
    tiny_text_encoder,
)

from diffdis.pipelines import (  # noqa: E402
    DiffDisPipeline,
    export_stable_diffusion,
    export_unet,
    make_scheduler,
    to_stable_diffusion,
)
from diffdis.utils.images import make_grid  # noqa: E402

PROMPTS = ["a red circle", "a blue square on the left"]


def make_pipe(**kwargs) -> DiffDisPipeline:
    pipe = DiffDisPipeline(**tiny_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(n: int, seed: int = 0) -> list:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def run(pipe: DiffDisPipeline, prompts=PROMPTS, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "np", **kwargs}
    kwargs.setdefault("generator", gens(len(prompts) * kwargs.get("num_images_per_prompt", 1)))
    return pipe(prompts, **kwargs).images




@pytest.fixture(scope="module")
def pixel_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pixel_model")
    make_pipe().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("latent", [False, True])
def test_output_types_and_shapes(latent):
    pipe = make_pipe(latent=latent)
    size = 16 if latent else 8
    images = run(pipe)
    assert images.shape == (2, size, size, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    pt = run(pipe, output_type="pt")
    assert pt.shape == (2, 3, size, size)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), images, atol=1e-6)
    pil = pipe("a star", num_inference_steps=2, num_images_per_prompt=3).images
    assert len(pil) == 3 and all(isinstance(im, Image.Image) and im.size == (size, size) for im in pil)


def test_guidance_batches_cond_and_uncond_together():
    pipe = make_pipe()
    batches = []
    pipe.unet.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    run(pipe, guidance_scale=3.0)
    assert batches == [4, 4]  # [uncond; cond] in one batch
    batches.clear()
    run(pipe, guidance_scale=1.0)
    assert batches == [2, 2]  # g <= 1 skips the unconditional pass


def test_guidance_formula_matches_two_manual_passes():
    """g = 1 gives the conditional sample; a negative prompt changes the guided one."""
    pipe = make_pipe()
    cond_only = run(pipe, guidance_scale=1.0)
    guided = run(pipe, guidance_scale=4.0)
    negative = run(pipe, guidance_scale=4.0, negative_prompt="a green star")
    assert np.abs(cond_only - guided).max() > 1e-3
    assert np.abs(guided - negative).max() > 1e-3


def test_seeded_images_do_not_depend_on_batch_size():
    pipe = make_pipe(latent=True)
    whole = run(pipe, num_images_per_prompt=2)
    chunked = run(pipe, num_images_per_prompt=2, batch_size=1)
    np.testing.assert_allclose(whole, chunked, atol=1e-5)
    assert np.abs(whole[0] - whole[1]).max() > 1e-3  # different generators, different images


@pytest.mark.parametrize("name", ["ddim", "dpm++", "dpmsolver", "euler", "ddpm"])
def test_schedulers(name):
    pipe = make_pipe()
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    first, second = run(pipe), run(pipe)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)  # step noise (DDPM, Euler) comes from the generators


def test_make_scheduler_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("heun", make_pipe().scheduler.config)


def test_context_is_last_hidden_state_with_projection_encoder():
    pipe = make_pipe(with_projection=True)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    context = pipe.encode_prompt(PROMPTS, torch.device("cpu"))
    assert context.shape == (2, 16, 32)
    torch.testing.assert_close(context, pipe.text_encoder(ids).last_hidden_state)
    assert np.isfinite(run(pipe)).all()


def test_works_with_a_clip_tokenizer(tmp_path):
    components = tiny_components()
    components["tokenizer"] = tok = tiny_clip_tokenizer(tmp_path / "tok")
    ids = tok("a red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    components["text_encoder"] = tiny_text_encoder(components["tokenizer"])
    pipe = DiffDisPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    assert run(pipe).shape == (2, 8, 8, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": []}, "no prompts"),
        ({"height": 7}, "multiples of 2"),
        ({"width": 0}, "multiples of 2"),
        ({"num_inference_steps": 1001}, r"\[1, 1000\]"),
        ({"num_inference_steps": 0}, r"\[1, 1000\]"),
        ({"output_type": "jpg"}, "output_type"),
        ({"generator": [torch.Generator()]}, "generators"),
        ({"negative_prompt": ["x", "y", "z"]}, "negative prompts"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_check_inputs_errors(kwargs, message):
    pipe = make_pipe()
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_size_multiple_includes_vae_factor():
    pipe = make_pipe(latent=True)
    assert pipe.vae_scale_factor == 2 and pipe.size_multiple() == 4 and pipe.default_size() == (16, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe("a star", height=18, num_inference_steps=2)
    assert run(pipe, height=8, width=24).shape == (2, 8, 24, 3)


def test_memory_switches():
    latent = make_pipe(latent=True)
    latent.enable_vae_slicing()
    latent.enable_vae_tiling()
    assert latent.vae.use_slicing and latent.vae.use_tiling
    latent.disable_vae_slicing()
    latent.disable_vae_tiling()
    pixel = make_pipe()
    pixel.enable_vae_slicing()  # no VAE: a logged no-op
    reference = run(pixel)
    pixel.enable_attention_slicing(1)
    np.testing.assert_allclose(run(pixel), reference, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            pixel.enable_xformers_memory_efficient_attention()
    assert DiffDisPipeline.model_cpu_offload_seq == "text_encoder->unet->vae"


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("latent", [False, True])
def test_save_load_round_trip(tmp_path, latent):
    pipe = make_pipe(latent=latent, with_projection=True)
    pipe.save_pretrained(tmp_path)
    loaded = DiffDisPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert (loaded.vae is None) == (not latent)
    assert type(loaded.text_encoder) is type(pipe.text_encoder)
    np.testing.assert_array_equal(run(loaded), run(pipe))


def test_custom_unet_class_round_trip(tmp_path):
    pipe = make_pipe(unet_cls=TinyCustomUNet)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == [TinyCustomUNet.__module__, "TinyCustomUNet"]
    loaded = DiffDisPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is TinyCustomUNet
    np.testing.assert_array_equal(run(loaded), run(pipe))


@pytest.mark.parametrize(
    "library, message",
    [("not_imported_anywhere", "has not been imported"), ("diffdis.no_such_module", "cannot import")],
)
def test_unknown_unet_library_is_a_clear_error(tmp_path, library, message):
    make_pipe().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["unet"] = [library, "SomeUNet"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        DiffDisPipeline.from_pretrained(tmp_path)


def test_from_pretrained_rejects_other_folders(tmp_path):
    with pytest.raises(ValueError, match="not a diffdis model folder"):
        DiffDisPipeline.from_pretrained(tmp_path)


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_exported_stable_diffusion_matches(tmp_path, guidance):
    pipe = make_pipe(latent=True, with_projection=True, unet_cls=TinyCustomUNet)
    export_stable_diffusion(pipe, tmp_path)
    assert "helpers_tiny" not in (tmp_path / "model_index.json").read_text()
    sd = StableDiffusionPipeline.from_pretrained(tmp_path)
    sd.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 4, "guidance_scale": guidance, "output_type": "np", "num_images_per_prompt": 2}
    ours = pipe(PROMPTS, generator=gens(4), **kwargs).images
    vanilla = sd(PROMPTS, generator=gens(4), **kwargs).images
    assert ours.shape == vanilla.shape == (4, 16, 16, 3)
    assert np.abs(ours - vanilla).max() < 1e-4


def test_export_keeps_the_callers_scheduler():
    pipe = make_pipe(latent=True)
    pipe.scheduler = make_scheduler("ddpm", {**pipe.scheduler.config, "steps_offset": 0, "clip_sample": True})
    sd = to_stable_diffusion(pipe)
    assert sd.scheduler.config.steps_offset == 1  # StableDiffusionPipeline rewrites its copy...
    assert pipe.scheduler.config.steps_offset == 0 and pipe.scheduler.config.clip_sample  # ...not ours


def test_pixel_space_exports_unet_only(tmp_path):
    pipe = make_pipe(unet_cls=TinyCustomUNet)
    with pytest.raises(ValueError, match="pixel-space"):
        export_stable_diffusion(pipe, tmp_path / "sd")
    export_unet(pipe.unet, tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert type(unet) is UNet2DConditionModel
    x, c = torch.randn(1, 3, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 10, c).sample, pipe.unet(x, 10, c).sample)


# ---------------------------------------------------------------- diffdis.cli.sample (tools/sample.py)
def test_sample_cli_is_reproducible(tmp_path, pixel_model_dir):
    from diffdis.cli import sample

    args = [str(pixel_model_dir), "--prompt", "a red circle", "--prompt", "a blue star", "--seed", "3", "7",
            "--steps", "3", "--device", "cpu"]
    assert sample.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert sample.main(args + ["--out", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    names = ["p000_s3.png", "p000_s7.png", "p001_s3.png", "p001_s7.png"]
    for name in names:
        a = np.asarray(Image.open(tmp_path / "a" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / name), dtype=np.int16)
        assert a.shape == (8, 8, 3) and np.abs(a - b).max() <= 1  # rounding may differ across batch sizes
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["prompts"] == ["a red circle", "a blue star"] and settings["seeds"] == [3, 7]
    assert settings["files"] == names and settings["height"] == 8 and settings["scheduler"] == "ddim"
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.width >= 2 * 128  # two columns of tiles upscaled to at least 128 px
    assert sample.main(args + ["--out", str(tmp_path / "c")]) == 0
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_sample_cli_images_per_prompt_and_file(tmp_path, pixel_model_dir):
    from diffdis.cli import sample

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# shapes\na red circle\n\na green square\n")
    args = [str(pixel_model_dir), "--prompts-file", str(prompts_file), "--seed", "0", "--num-images-per-prompt",
            "2", "--steps", "2", "--scheduler", "euler", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert sample.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("p*.png")) == [
        "p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", ""], "no prompts"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "does not exist"),
        (["--prompt", "a star", "--height", "7"], "multiples of 2"),
        (["--prompt", "a star", "--steps", "5000"], "num_inference_steps"),
        (["--prompt", "a star", "--num-images-per-prompt", "0"], "num-images-per-prompt"),
    ],
)
def test_sample_cli_errors(tmp_path, pixel_model_dir, capsys, extra, message):
    from diffdis.cli import sample

    assert sample.main([str(pixel_model_dir), "--out", str(tmp_path), "--device", "cpu"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: loading progress bars
    assert err.startswith("error:") and message in err
    assert not (tmp_path / "settings.json").exists()


def test_sample_cli_names_a_prompts_file_it_cannot_read(tmp_path, pixel_model_dir, capsys):
    from diffdis.cli import sample

    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes([0xFF, 0xFE, 0x00, 0x81]) * 8)
    for path, message in ((tmp_path, "is not a regular file"), (binary, "is not UTF-8 text")):
        assert sample.main([str(pixel_model_dir), "--out", str(tmp_path / "out"), "--prompts-file", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error:") and message in err and str(path) in err


def test_sample_cli_rejects_non_model_folder(tmp_path, capsys):
    from diffdis.cli import sample

    assert sample.main([str(tmp_path), "--prompt", "a star"]) == 2
    assert "no model_index.json" in capsys.readouterr().err


# ---------------------------------------------------------------- grid
def test_make_grid():
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    grid = make_grid(images, captions=["a", "b", "c"], ncols=2, upscale=4)
    assert grid.width >= 2 * 32 and grid.height > 2 * 32
    assert grid.getpixel((2 + 5, 2 + 5)) == (255, 0, 0)
    assert make_grid(images).size[0] >= 2 * 8
    with pytest.raises(ValueError):
        make_grid(images, captions=["only one"])


# ---------------------------------------------------------------- with the real DualStreamUNet
@pytest.mark.parametrize("library", ["diffdis.models.dual_stream_unet", "diffdis.models"])
def test_dual_stream_unet_round_trip_and_export(tmp_path, library):
    models = pytest.importorskip("diffdis.models")
    components = tiny_components(latent=True, with_projection=True)
    components["unet"] = models.DualStreamUNet.from_unet(components["unet"], text_dim=32).eval()
    pipe = DiffDisPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "model")
    index_file = tmp_path / "model" / "model_index.json"
    index = json.loads(index_file.read_text())
    assert index["unet"] == ["diffdis.models.dual_stream_unet", "DualStreamUNet"]  # what save_pretrained writes
    index_file.write_text(json.dumps({**index, "unet": [library, "DualStreamUNet"]}))
    loaded = DiffDisPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is models.DualStreamUNet
    expected = run(pipe, prompts=PROMPTS[:1])
    np.testing.assert_array_equal(run(loaded, prompts=PROMPTS[:1]), expected)
    export_stable_diffusion(loaded, tmp_path / "sd")
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    sd.set_progress_bar_config(disable=True)
    vanilla = sd(PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, output_type="np", generator=gens(1)).images
    assert np.abs(vanilla - expected).max() < 1e-4
