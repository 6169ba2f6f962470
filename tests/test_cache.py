"""The latent cache: one VAE encoding per image, latents drawn bit-exactly as encoding would, refused when stale."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers_tiny import free_port, save_tiny_stable_diffusion, tiny_vae
from PIL import Image
from safetensors.torch import load_file
from diffusers import UNet2DConditionModel as StableDiffusionUNet

from diffdis.config import load_config
from diffdis.data import ImageTextCollator, load_image_text_dataset
from diffdis.data.cache import (
    MANIFEST_NAME,
    LatentCacheCollator,
    build_latent_cache,
    latent_cache_manifest,
    load_latent_cache,
    manifest_for_config,
    read_manifest,
    sample_latents,
)
from diffdis.models.components import load_vae
from diffdis.train.trainer import _to_latents

ROOT = Path(__file__).resolve().parent.parent
RESOLUTION = 8
NUM_IMAGES = 7
CORRUPT = 3  # index of the unreadable file


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    """An imagefolder of 7 images of different sizes (so the crop matters), one of them not an image."""
    root = tmp_path_factory.mktemp("imagefolder")
    rows = []
    for i in range(NUM_IMAGES):
        name = f"{i}.png"
        if i == CORRUPT:
            (root / name).write_bytes(b"\x89PNG not really")
        else:
            Image.new("RGB", (10 + 3 * i, 8 + i), (30 * i, 100, 200 - 20 * i)).save(root / name)
        rows.append({"file_name": name, "text": f"a red circle {i}", "captions": [f"a red circle {i}", f"a red disc {i}"]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def dataset(imagefolder):
    return load_image_text_dataset(str(imagefolder))


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def collator() -> ImageTextCollator:
    return ImageTextCollator(None, RESOLUTION, defer_choice=True)


@pytest.fixture(scope="module")
def cache(dataset, vae, tmp_path_factory) -> Path:
    return build_latent_cache(dataset, collator(), vae, tmp_path_factory.mktemp("built") / "cache", batch_size=4, device="cpu")


def _cached_batch(cache_dir: Path, vae) -> dict:
    rows = load_latent_cache(cache_dir, latent_cache_manifest(vae, RESOLUTION))
    return LatentCacheCollator()([rows[i] for i in range(len(rows))])


def test_cache_holds_every_readable_image_and_counts_the_unreadable(cache, dataset, vae):
    manifest = read_manifest(cache)
    assert (manifest["num_source_examples"], manifest["num_examples"], manifest["num_skipped"]) == (7, 6, 1)
    assert manifest["latent_shape"] == [4, RESOLUTION // 2, RESOLUTION // 2]
    rows = load_latent_cache(cache, latent_cache_manifest(vae, RESOLUTION))
    assert len(rows) == 6
    assert rows[0]["mean"].dtype == torch.float32 and rows[0]["mean"].shape == (4, 4, 4)
    assert [int(i) for i in rows["index"]] == [i for i in range(NUM_IMAGES) if i != CORRUPT]
    assert rows[4]["caption"] == dataset[5]["caption"] and rows[4]["captions"] == dataset[5]["captions"]
    assert not any(p.name.startswith(".") for p in cache.parent.iterdir())  # no partial folder left


def test_sampled_latents_equal_encoding_the_image(cache, dataset, vae):
    batch = _cached_batch(cache, vae)
    pixels = collator()([dataset[i] for i in range(len(dataset))])  # drops the unreadable image
    assert batch["caption_options"] == pixels["caption_options"]
    gen_encode, gen_cache = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = _to_latents(vae, pixels["pixel_values"], gen_encode)  # (6, 4, 4, 4)
    latents = sample_latents(batch["latent_mean"], batch["latent_std"], vae.config.scaling_factor, gen_cache)
    assert latents.shape == expected.shape
    assert (latents - expected).abs().max().item() < 1e-6
    assert torch.equal(gen_encode.get_state(), gen_cache.get_state())  # the same draw, so the next ones agree too
    mode = sample_latents(batch["latent_mean"], batch["latent_std"], 0.5, None, deterministic=True)
    assert torch.equal(mode, batch["latent_mean"] * 0.5)


def test_sample_latents_is_bit_exact_for_one_batch(vae):
    pixels = torch.rand(3, 3, RESOLUTION, RESOLUTION) * 2 - 1
    dist = vae.encode(pixels).latent_dist
    latents = sample_latents(dist.mean, dist.std, vae.config.scaling_factor, torch.Generator().manual_seed(0))
    assert torch.equal(latents, _to_latents(vae, pixels, torch.Generator().manual_seed(0)))
    half = sample_latents(dist.mean.float(), dist.std.float(), 1.0, torch.Generator().manual_seed(0), dtype=torch.float16)
    z = dist.mean.half() + dist.std.half() * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    assert torch.equal(half, z.float())  # a half-precision VAE: the draw and the sum are in its dtype


def test_a_cache_built_for_other_settings_is_refused(cache, vae):
    with pytest.raises(ValueError, match=r"resolution=8 \(expected 16\)"):
        load_latent_cache(cache, latent_cache_manifest(vae, 16))
    with pytest.raises(ValueError, match="vae_weights_hash"):
        load_latent_cache(cache, latent_cache_manifest(tiny_vae(seed=1), RESOLUTION))
    with pytest.raises(ValueError, match="random_flip"):
        load_latent_cache(cache, latent_cache_manifest(vae, RESOLUTION, random_flip=True))
    with pytest.raises(ValueError, match="source"):
        load_latent_cache(cache, latent_cache_manifest(vae, RESOLUTION, source={"name": "elsewhere"}))


def test_a_missing_or_corrupt_cache_is_a_one_line_error(cache, vae, tmp_path):
    expected = latent_cache_manifest(vae, RESOLUTION)
    with pytest.raises(ValueError, match="no latent cache"):
        load_latent_cache(tmp_path / "nothing", expected)
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    (broken / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt latent_cache.json"):
        load_latent_cache(broken, expected)
    shutil.copy(cache / MANIFEST_NAME, broken / MANIFEST_NAME)
    for arrow in broken.glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(ValueError, match="is corrupt") as err:
        load_latent_cache(broken, expected)
    assert "\n" not in str(err.value)
    (broken / MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match="no latent_cache.json"):
        load_latent_cache(broken, expected)


class _FailingCollator(ImageTextCollator):
    """Decodes ``fail_after`` examples, then raises ``error`` (a crash or Ctrl-C in the middle of a build)."""

    def __init__(self, fail_after: int, error: BaseException) -> None:
        super().__init__(None, RESOLUTION, defer_choice=True)
        self.fail_after, self.error, self.calls = fail_after, error, 0

    def __call__(self, examples):
        self.calls += 1
        if self.calls > self.fail_after:
            raise self.error
        return super().__call__(examples)


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_an_interrupted_build_leaves_no_cache_folder(dataset, vae, tmp_path, error):
    out = tmp_path / "cache"
    with pytest.raises(type(error)):
        build_latent_cache(dataset, _FailingCollator(5, error), vae, out, batch_size=2, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_builds_leftovers_are_cleared_and_an_existing_cache_kept(dataset, vae, tmp_path):
    out = tmp_path / "cache"
    (tmp_path / ".cache.partial" / "hf-00000").mkdir(parents=True)  # as a SIGKILLed build leaves it
    build_latent_cache(dataset, collator(), vae, out, batch_size=8, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    with pytest.raises(FileExistsError, match="overwrite"):
        build_latent_cache(dataset, collator(), vae, out, batch_size=8, device="cpu")
    build_latent_cache(dataset.select(range(2)), collator(), vae, out, batch_size=8, device="cpu", overwrite=True)
    assert read_manifest(out)["num_examples"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


class _ThreadRanks:
    """Stands in for an ``Accelerator`` of ``world`` processes: one thread per rank, a barrier between them."""

    def __init__(self, rank: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self.barrier = rank, barrier.parties, barrier
        self.is_main_process = rank == 0

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=60)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_encode_contiguous_shards_that_merge_in_order(cache, dataset, vae, tmp_path, world):
    out, barrier, errors = tmp_path / "sharded", threading.Barrier(world), []

    def rank(r: int) -> None:
        try:
            build_latent_cache(dataset, collator(), vae, out, batch_size=2, device="cpu", accelerator=_ThreadRanks(r, barrier))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert read_manifest(out)["num_skipped"] == 1
    sharded, single = _cached_batch(out, vae), _cached_batch(cache, vae)
    assert torch.equal(sharded["index"], single["index"])
    assert torch.allclose(sharded["latent_mean"], single["latent_mean"], atol=1e-6)
    assert sharded["caption_options"] == single["caption_options"]


def _cli():
    from diffdis.cli import cache

    return cache


def test_cli_builds_a_cache_that_the_config_accepts(imagefolder, tmp_path, capsys):
    sd = save_tiny_stable_diffusion(tmp_path / "sd")
    overrides = [f"model.pretrained={sd}", f"data.name={imagefolder}", f"data.resolution={RESOLUTION}", "data.num_workers=0"]
    out = tmp_path / "cache"
    assert _cli().main(["--config", "sd15", *overrides, "--out", str(out), "--batch-size", "4"]) == 0
    assert "6 examples, 1 skipped" in capsys.readouterr().out
    cfg = load_config("sd15", overrides)
    vae = load_vae(str(sd))
    assert len(load_latent_cache(out, manifest_for_config(cfg, vae))) == 6
    with pytest.raises(ValueError, match="resolution"):
        load_latent_cache(out, manifest_for_config(load_config("sd15", overrides + ["data.resolution=16"]), vae))

    assert _cli().main(["--config", "sd15", *overrides, "--out", str(out)]) == 1  # exists: one line, exit 1
    err = capsys.readouterr().err
    assert err.startswith("error: FileExistsError") and err.count("\n") == 1
    assert _cli().main(["--config", "sd15", f"data.name={imagefolder}", "--out", str(tmp_path / "x")]) == 2
    assert "model.pretrained" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_under_two_processes_matches_one(imagefolder, tmp_path):
    """``accelerate launch`` with two CPU ranks (gloo): each encodes half, rank 0 merges; same cache as one process."""
    sd = save_tiny_stable_diffusion(tmp_path / "sd")
    overrides = [f"model.pretrained={sd}", f"data.name={imagefolder}", f"data.resolution={RESOLUTION}", "data.num_workers=0"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = tmp_path / "cache"
    proc = subprocess.run(launcher + [str(ROOT / "tools" / "cache.py"), "--config", "sd15", *overrides, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("latent cache:") == 1  # printed by the main process only
    vae = load_vae(str(sd))
    single = tmp_path / "single"
    build_latent_cache(load_image_text_dataset(str(imagefolder)), collator(), vae, single, batch_size=4, device="cpu")
    two, one = _cached_batch(out, vae), _cached_batch(single, vae)
    assert torch.equal(two["index"], one["index"]) and read_manifest(out)["num_skipped"] == 1
    assert torch.allclose(two["latent_mean"], one["latent_mean"], atol=1e-6)


@pytest.mark.slow
def test_a_run_on_the_cache_trains_exactly_as_one_that_encodes_every_batch(tmp_path):
    """The trainer with data.cache_dir: the same losses and weights as encoding each batch with the VAE (same seed),
    up to float rounding: the cache encoded the images in other batch groupings than the shuffled training batches."""
    from helpers_data import write_imagefolder
    from helpers_train import accelerate

    sd = save_tiny_stable_diffusion(tmp_path / "sd")
    folder = write_imagefolder(tmp_path / "data", 16)
    overrides = [f"model.pretrained={sd}", f"data.name={folder}", "data.resolution=16", "data.num_workers=0"]
    assert _cli().main(["--config", "sd15", *overrides, "--out", str(tmp_path / "cache"), "--batch-size", "4"]) == 0
    run = ["--config", "sd15", *overrides, "data.validation_split=null", "train.max_steps=3", "train.batch_size=4",
           "train.gradient_accumulation_steps=1", "train.mixed_precision=no", "train.checkpointing_steps=0",
           "train.lr_warmup_steps=1", "train.log_every=1", "train.report_to=none", "train.learning_rate=1e-3"]
    accelerate(run + [f"train.output_dir={tmp_path / 'encoded'}"])
    accelerate(run + [f"train.output_dir={tmp_path / 'cached'}", f"data.cache_dir={tmp_path / 'cache'}"])

    def losses(out: Path) -> list:
        rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    encoded, cached = losses(tmp_path / "encoded"), losses(tmp_path / "cached")
    assert len(encoded) == 3 and encoded == pytest.approx(cached, rel=1e-5, abs=0)
    assert encoded[0] == cached[0]  # the first step's batch draws the same noise from the same generator state
    a = load_file(str(tmp_path / "encoded" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "cached" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    start = StableDiffusionUNet.from_pretrained(sd, subfolder="unet").state_dict()
    moved = [(a[k] - start[k.split(".", 1)[1]]).abs().max().item() for k in a if k.split(".", 1)[-1] in start]
    assert moved and max(moved) > 1e-4  # training moved the weights: the comparison above can fail
