"""The zero-shot pipeline: saved beside the text-to-image one, loaded with ``from_pretrained``, γ/K/w from its own config."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffdis.eval.api import EvaluationError, applicable  # noqa: E402
from diffdis.models import DualStreamUNet  # noqa: E402
from diffdis.pipelines import DiffDisPipeline  # noqa: E402
from diffdis.pipelines.zeroshot import ZeroShotModelError  # noqa: E402
from diffdis.pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline, load_zero_shot_pipeline  # noqa: E402

from helpers_tiny import CONTEXT_DIM, tiny_components  # noqa: E402


def _parts(seed: int = 0) -> dict:
    """Tiny pixel-space components with a dual-stream UNet whose text stream is perturbed (its output layer is zero
    at init, which would make every query the same)."""
    torch.manual_seed(seed)
    parts = tiny_components(with_projection=True)
    unet = DualStreamUNet.from_unet(parts["unet"], text_dim=CONTEXT_DIM, fusion="joint").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.new_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    parts["unet"] = unet
    return parts


def _pixels(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (n, 3, 8, 8)


def _gens(n: int = 3):
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model folder as training writes it: the text-to-image pipeline, then the zero-shot index over its components."""
    folder = tmp_path_factory.mktemp("model")
    parts = _parts()
    DiffDisPipeline(**parts).save_pretrained(folder)
    pipe = DiffDisZeroShotPipeline(**parts, text_scale=0.5, num_inference_steps=3, guidance_scale=1.0, method="diffdis")
    pipe.save_index(folder)
    return folder, pipe


def test_saved_beside_the_text_to_image_pipeline_sharing_its_weights(saved):
    folder, live = saved
    index = json.loads((folder / "zeroshot_index.json").read_text())
    assert index["_class_name"] == "DiffDisZeroShotPipeline" and index["unet"] == ["diffdis.models.dual_stream_unet", "DualStreamUNet"]
    assert (index["text_scale"], index["num_inference_steps"], index["guidance_scale"]) == (0.5, 3, 1.0)
    assert (folder / "model_index.json").is_file() and len(list(folder.rglob("*.safetensors"))) == 2  # unet, text encoder
    loaded = load_zero_shot_pipeline(folder)
    assert isinstance(loaded.unet, DualStreamUNet) and loaded.resolution == 8
    torch.testing.assert_close(loaded.encode_images(_pixels(), _gens()), live.encode_images(_pixels(), _gens()))
    texts = ["a red circle", "a blue square"]
    torch.testing.assert_close(loaded.encode_text(texts), live.encode_text(texts))


def test_inference_uses_the_saved_gamma_k_and_w_and_never_the_training_config(saved, tmp_path):
    folder, live = saved
    default = live.encode_images(_pixels(), _gens())
    explicit = live.encode_images(_pixels(), _gens(), num_inference_steps=3, guidance_scale=1.0)
    torch.testing.assert_close(default, explicit)  # the config's K and w are the defaults
    assert not torch.allclose(default, live.encode_images(_pixels(), _gens(), num_inference_steps=1, guidance_scale=0.0))
    copy = tmp_path / "copy"
    DiffDisPipeline.from_pretrained(folder).save_pretrained(copy)
    index = json.loads((folder / "zeroshot_index.json").read_text())
    (copy / "zeroshot_index.json").write_text(json.dumps(dict(index, text_scale=0.9)))
    (copy / "diffdis_config.yaml").write_text("loss:\n  text_scale: 0.5\n")  # a record only: must not be read
    changed = load_zero_shot_pipeline(copy)
    assert changed.config.text_scale == 0.9
    assert not torch.allclose(changed.encode_images(_pixels(), _gens()), default)


def test_call_scores_pil_images_against_texts(saved):
    _, pipe = saved
    images = [Image.new("RGB", (20, 20), colour) for colour in ((220, 30, 30), (30, 30, 220))]
    texts = ["a red circle", "a blue square", "a green ring"]
    out = pipe(images, texts, generator=_gens(2))
    assert out.logits_per_image.shape == (2, 3) and out.image_embeds.shape == (2, CONTEXT_DIM)
    torch.testing.assert_close(out.logits_per_image, out.image_embeds @ out.text_embeds.T)
    pixels = pipe.preprocess(images)
    assert pixels.shape == (2, 3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(pipe(pixels, texts, generator=_gens(2)).logits_per_image, out.logits_per_image)


def test_a_diffusion_classifier_model_has_logits_but_no_features():
    pipe = DiffDisZeroShotPipeline(**_parts(), classifier="diffusion_classifier", method="gen_only")
    with pytest.raises(ZeroShotModelError, match="gen_only"):
        pipe.encode_images(_pixels(), _gens())
    out = pipe(_pixels(2), ["a red circle", "a blue square"], generator=_gens(2), num_timesteps=2)
    assert out.logits_per_image.shape == (2, 2) and out.image_embeds is None and out.text_embeds is None
    assert torch.isfinite(out.logits_per_image).all() and (out.logits_per_image <= 0).all()  # negative errors


def test_bad_settings_and_folders_are_one_line_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="classifier"):
        DiffDisZeroShotPipeline(**_parts(), classifier="nearest")
    with pytest.raises(ValueError, match="text_scheduler"):
        DiffDisZeroShotPipeline(**_parts(), text_scheduler="euler")
    folder, _ = saved
    old = tmp_path / "old"
    DiffDisPipeline.from_pretrained(folder).save_pretrained(old)  # a folder without the zero-shot index
    with pytest.raises(ZeroShotModelError, match="zeroshot_index.json"):
        load_zero_shot_pipeline(old)
    with pytest.raises(EvaluationError, match="zeroshot_index.json"):
        applicable(old)
    assert applicable(folder) == {"method": "diffdis", "generates": True, "discriminates": True, "classifier": "diffdis",
                                   "trained_on": None}


def test_guidance_is_refused_for_a_model_that_never_trained_the_image_free_branch(saved, tmp_path):
    pipe = DiffDisZeroShotPipeline(**_parts(), num_inference_steps=2, image_dropout=0.0)
    assert pipe.encode_images(_pixels(), _gens()).shape == (3, CONTEXT_DIM)  # w = 0 (the default) needs no ∅ branch
    with pytest.raises(ZeroShotModelError, match="p_uncond=0"):
        pipe.encode_images(_pixels(), _gens(), guidance_scale=1.0)
    pipe.save_index(tmp_path)
    assert json.loads((tmp_path / "zeroshot_index.json").read_text())["image_dropout"] == 0.0
    folder, _ = saved  # its index records 0.1 (the constructor's default): guidance as before
    index = json.loads((folder / "zeroshot_index.json").read_text())
    assert index["image_dropout"] == 0.1
    old = tmp_path / "old"
    DiffDisPipeline.from_pretrained(folder).save_pretrained(old)
    index.pop("image_dropout")  # a folder saved before the field existed was trained with p_uncond = 0.1
    (old / "zeroshot_index.json").write_text(json.dumps(index))
    loaded = load_zero_shot_pipeline(old)
    assert loaded.config.image_dropout == 0.1 and loaded.encode_images(_pixels(), _gens()).shape == (3, CONTEXT_DIM)
