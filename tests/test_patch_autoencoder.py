"""PatchAutoencoder (pixel patches folded into channels): exactness, saving, the pipeline and the trainer with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_tiny import CONTEXT_DIM, tiny_text_encoder, tiny_tokenizer  # noqa: E402

from diffdis.config import ConfigError, load_config  # noqa: E402
from diffdis.models.components import load_vae_folder, vae_scale_factor  # noqa: E402
from diffdis.models.patch_autoencoder import PatchAutoencoder  # noqa: E402
from diffdis.pipelines import DiffDisPipeline, export_stable_diffusion, export_unet, make_scheduler  # noqa: E402
from diffdis.pipelines.zeroshot import images_to_latents  # noqa: E402


def test_encode_decode_is_exact_and_folds_patches():
    ae = PatchAutoencoder(patch_size=2)
    x = torch.randn(3, 3, 8, 12)
    z = ae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 12, 4, 6)
    # channel c*4 + 2*dy + dx of latent pixel (i, j) is image pixel (2i + dy, 2j + dx) of channel c
    assert torch.equal(z[:, 4 * 1 + 2 * 1 + 0, 2, 3], x[:, 1, 5, 6])
    assert torch.equal(ae.decode(z).sample, x)
    assert torch.equal(ae(x), x)
    assert vae_scale_factor(ae) == 2 and vae_scale_factor(None) == 1


def test_bad_shapes_are_clear_errors():
    ae = PatchAutoencoder(patch_size=2)
    with pytest.raises(ValueError, match="image height 7 is not a multiple of the patch size 2"):
        ae.encode(torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError, match="latents have 3 channels; this patch autoencoder decodes 12"):
        ae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="patch_size=0"):
        PatchAutoencoder(patch_size=0)


def test_saves_and_loads_by_class(tmp_path):
    PatchAutoencoder(patch_size=4, in_channels=1).save_pretrained(tmp_path / "vae")
    loaded = load_vae_folder(tmp_path / "vae")
    assert isinstance(loaded, PatchAutoencoder)
    assert (loaded.config.patch_size, loaded.latent_channels) == (4, 16)


def _patch_pipe() -> DiffDisPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=12, out_channels=12, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=2, norm_num_groups=8,
    )
    from diffusers import DDIMScheduler

    tokenizer = tiny_tokenizer()
    pipe = DiffDisPipeline(unet, tiny_text_encoder(tokenizer), tokenizer, make_scheduler("ddim", DDIMScheduler().config),
                           PatchAutoencoder(patch_size=2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    return pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=3.0, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(2)]).images


def test_pipeline_generates_full_resolution_and_round_trips(tmp_path):
    pipe = _patch_pipe()
    assert pipe.default_size() == (8, 8) and pipe.size_multiple() == 4
    images = _images(pipe)
    assert images.shape == (2, 8, 8, 3)
    pipe.save_pretrained(tmp_path / "model")
    again = DiffDisPipeline.from_pretrained(tmp_path / "model")
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.vae, PatchAutoencoder)
    assert abs(_images(again) - images).max() == 0.0
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe("a red circle", height=6, width=8, num_inference_steps=1)


def test_export_keeps_the_unet_and_refuses_stable_diffusion(tmp_path):
    pipe = _patch_pipe()
    export_unet(pipe.unet, tmp_path / "unet")
    assert UNet2DConditionModel.from_pretrained(tmp_path / "unet").config.in_channels == 12
    with pytest.raises(ValueError, match="PatchAutoencoder"):
        export_stable_diffusion(pipe, tmp_path / "sd")


def test_zero_shot_latents_are_the_folded_pixels():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(images_to_latents(x, PatchAutoencoder(2)), torch.nn.functional.pixel_unshuffle(x, 2))


def test_config_checks_the_unet_against_the_patch_size():
    from diffdis.train.build import build_components

    base = ["model.patch_size=2", "model.unet.block_out_channels=[16,32]", "model.unet.norm_num_groups=8",
            "model.text_encoder.hidden_size=32", "model.text_encoder.num_attention_heads=2"]
    captions = ["a red circle", "a blue square"]
    rgb = ["model.unet.in_channels=3", "model.unet.out_channels=3"]
    with pytest.raises(ConfigError, match=r"in_channels and out_channels must be 12 \(3 x model.patch_size\^2"):
        build_components(load_config("tiny", base + rgb), captions)
    with pytest.raises(ConfigError, match="sample_size=16 must be data.resolution / model.patch_size = 16 / 2 = 8"):
        build_components(load_config("tiny", base + ["model.unet.sample_size=16"]), captions)
    with pytest.raises(ConfigError, match="model.patch_size=3 must be at least 1 and divide data.resolution=16"):
        load_config("tiny", ["model.patch_size=3"])
    with pytest.raises(ConfigError, match="patch_size > 1 is for tiny pixel-space models"):
        load_config("tiny", ["model.use_vae=true"])
    # plain pixel space (patch_size=1) needs 3 channels at the full resolution
    with pytest.raises(ConfigError, match=r"must be 3 \(3 x model.patch_size\^2 = 3 x 1\^2\)"):
        build_components(load_config("tiny", base + ["model.patch_size=1"]), captions)
    components = build_components(load_config("tiny", base), captions)
    assert isinstance(components.vae, PatchAutoencoder) and components.unet.config.in_channels == 12
