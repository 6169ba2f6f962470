"""Tests of diffdis.eval: reference classifier, prompt adherence, FID."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from diffdis.data import embedded
from diffdis.eval import (
    adherence_prompts,
    compute_fid,
    dataset_tensors,
    evaluate_classifier,
    fid_report,
    inception_extractor,
    load_or_train_reference_classifier,
    pixel_colour,
    prompt_adherence,
    reference_extractor,
    train_reference_classifier,
)
from diffdis.eval.fid import FeatureExtractor
from diffdis.eval.reference import AttributeClassifier, augment, load_classifier, save_classifier

# A short training run: enough for shape and colour well above 0.9 on clean images.
QUICK = dict(resolution=16, seed=0, steps=200, batch_size=64, num_train=2000, num_threads=1)




@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference_cache")


@pytest.fixture(scope="module")
def classifier(cache_dir) -> AttributeClassifier:
    return train_reference_classifier(**QUICK, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def test_data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return dataset_tensors(embedded.make_embedded_dataset("test", num_samples=600, resolution=16))


def _noised(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """uint8 images plus Gaussian noise of std ``sigma`` (in [0, 1] units)."""
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 255 + sigma * torch.randn(images.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------ classifier


def test_classifier_shapes_and_input_types():
    model = AttributeClassifier(resolution=32).eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    logits = model(x)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        "shape": (3, 6),
        "colour": (3, 6),
        "size": (3, 2),
        "position": (3, 5),
    }
    assert model.features(x).shape == (3, 128)
    torch.testing.assert_close(model.features(x), model.features(x.float() / 255))


def test_classifier_learns(classifier, test_data):
    images, labels = test_data
    acc = evaluate_classifier(classifier, images, labels)
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.97, acc
    assert acc["size"] >= 0.9 and acc["position"] >= 0.9, acc
    noisy = evaluate_classifier(classifier, _noised(images, 0.1), labels)
    assert noisy["shape"] >= 0.8 and noisy["colour"] >= 0.95, noisy


def test_augment_range_and_determinism(test_data):
    images, _ = test_data
    a = augment(images[:16], torch.Generator().manual_seed(3))
    b = augment(images[:16], torch.Generator().manual_seed(3))
    assert a.shape == (16, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)


def test_classifier_cache_round_trip(classifier, cache_dir, tmp_path, test_data, monkeypatch):
    images, _ = test_data
    save_classifier(classifier, tmp_path / "c.safetensors")
    reloaded = load_classifier(tmp_path / "c.safetensors")
    torch.testing.assert_close(reloaded(images[:8])["shape"], classifier(images[:8])["shape"])

    # The fixture trained with cache_dir, so the same arguments must load, not train.
    def fail(*args, **kwargs):
        raise AssertionError("cache miss: retrained")

    monkeypatch.setattr("diffdis.eval.reference.train_reference_classifier", fail)
    cached = load_or_train_reference_classifier(cache_dir=cache_dir, **QUICK)
    torch.testing.assert_close(cached(images[:8])["colour"], classifier(images[:8])["colour"])
    assert not list(cache_dir.glob("*.tmp")), "temporary files left behind"


def test_pixel_colour_matches_true_colour(test_data):
    images, labels = test_data
    agree = (pixel_colour(images) == labels["colour"]).float().mean().item()
    assert agree >= 0.95
    assert pixel_colour(images.float() / 255).equal(pixel_colour(images))


# ------------------------------------------------------------------- adherence


def test_adherence_prompts_cover_all_combinations():
    prompts = adherence_prompts(num_per_combo=2, seed=0)
    assert len(prompts) == 2 * len(embedded.SHAPES) * len(embedded.COLOURS)
    combos = {(p["shape_id"], p["colour_id"]) for p in prompts}
    assert len(combos) == len(embedded.SHAPES) * len(embedded.COLOURS)
    for p in prompts:
        assert p["prompt"] == f"a {p['colour']} {p['shape']}"
        assert embedded.SHAPES[p["shape_id"]] == p["shape"] and embedded.COLOURS[p["colour_id"]] == p["colour"]
    assert adherence_prompts(num_per_combo=2, seed=0) == prompts


def test_prompt_adherence_real_and_shuffled(classifier, test_data):
    images, labels = test_data
    real = prompt_adherence(
        images, labels["shape"], labels["colour"], classifier, labels["size"], labels["position"]
    )
    assert real["adherence/shape"] >= 0.9 and real["adherence/colour"] >= 0.9, real
    assert real["adherence/both"] >= 0.85 and real["adherence/colour_pixel"] >= 0.95, real
    assert real["adherence/colour_agreement"] >= 0.95 and real["adherence/size"] >= 0.9, real

    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = prompt_adherence(images, labels["shape"][perm], labels["colour"][perm], classifier)
    chance = 1 / len(embedded.SHAPES)
    assert abs(shuffled["adherence/shape"] - chance) < 0.08, shuffled
    assert abs(shuffled["adherence/colour"] - chance) < 0.08, shuffled
    assert shuffled["adherence/both"] < 0.08 and "adherence/size" not in shuffled


# ------------------------------------------------------------------------- FID


def test_fid_of_real_against_itself_is_zero(classifier, test_data):
    images, _ = test_data
    extractor = reference_extractor(classifier)
    report = fid_report(images, images, extractor, batch_size=128)
    feats = extractor(images).double()
    scale = feats.var(dim=0).sum().item()  # trace of the covariance
    assert abs(report["fid"]) < 1e-3 * scale, (report, scale)
    assert report["num_real"] == report["num_fake"] == images.shape[0]
    assert report["feature_extractor"].startswith("reference-r16-")
    assert report["resize"] == "bilinear-antialias-16"


def test_fid_grows_with_noise(classifier, test_data):
    images, _ = test_data
    real, fake = images[:300], images[300:]
    extractor = reference_extractor(classifier)
    fids = [compute_fid(real, _noised(fake, s, seed=1), extractor) for s in (0.0, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_fid_real_stats_cache_round_trip(classifier, test_data, tmp_path):
    images, _ = test_data
    real, fake = images[:300], _noised(images[300:], 0.1)
    extractor = reference_extractor(classifier)
    uncached = compute_fid(real, fake, extractor)
    first = compute_fid(real, fake, extractor, real_stats_cache=tmp_path, cache_key="embedded-test-300")
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and extractor.name in files[0].name
    # Iterable input and no real images at all: statistics come from the cache.
    second = fid_report(None, list(fake.split(64)), extractor, real_stats_cache=tmp_path, cache_key="embedded-test-300")
    assert first == pytest.approx(uncached, rel=1e-6)
    assert second["fid"] == pytest.approx(first, rel=1e-6)
    assert second["num_real"] == 300 and second["num_fake"] == fake.shape[0]
    with pytest.raises(ValueError):
        compute_fid(real, fake, extractor, real_stats_cache=tmp_path)


def test_feature_extractor_resizes_and_skips_probe():
    calls = []

    class Mean(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # (N, 6)

    extractor = FeatureExtractor(Mean(), num_features=6, name="mean-std", input_size=8)
    real = torch.randint(0, 128, (40, 3, 32, 32), dtype=torch.uint8)
    fake = torch.randint(64, 256, (40, 3, 32, 32), dtype=torch.uint8)
    report = fid_report(real, fake, extractor, batch_size=16)
    assert report["fid"] > 0 and report["resize"] == "bilinear-antialias-8"
    assert calls and all(shape[1:] == (3, 8, 8) for shape in calls)  # no (1, 3, 299, 299) probe


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity installed")
def test_inception_extractor_needs_torch_fidelity(tmp_path):
    with pytest.raises(ModuleNotFoundError):
        inception_extractor(tmp_path / "missing.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity not installed")
def test_inception_extractor_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception_extractor(tmp_path / "missing.pth")


def test_prompt_adherence_resizes_to_classifier_resolution(classifier, test_data):
    images, labels = test_data
    big = torch.nn.functional.interpolate(images[:200].float(), scale_factor=2, mode="nearest").to(torch.uint8)
    scores = prompt_adherence(big, labels["shape"][:200], labels["colour"][:200], classifier)
    assert scores["adherence/colour"] >= 0.95 and scores["adherence/num_images"] == 200


@pytest.mark.slow
def test_default_reference_classifier_accuracy(tmp_path):
    """The default recipe (800 steps, full train split): >= 99 % shape and colour on the clean test split."""
    model = load_or_train_reference_classifier(resolution=16, cache_dir=tmp_path, num_threads=1)
    images, labels = dataset_tensors(embedded.make_embedded_dataset("test", resolution=16))
    acc = evaluate_classifier(model, images, labels)
    assert acc["shape"] >= 0.99 and acc["colour"] >= 0.99, acc
