"""FID and prompt adherence as running sums: streamed batch by batch, sharded over processes, summed.

The two-process test launches ``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo) and
checks that the result equals the one-process result on the same images, that each process fed only
its shard into the metric, and that FID synchronised sums (all_reduce), never images (no gather).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_fid import (
    GATHERS,
    NUM_IMAGES,
    SETTINGS,
    TintedNoisePipe,
    captions,
    evaluate_everything,
    lazy,
    moments_extractor,
    real_images,
)
from helpers_tiny import free_port

from diffdis.eval import compute_fid, fid_report, prompt_adherence
from diffdis.eval.suite import (
    LazyImages,
    adherence_grid,
    evaluate_adherence,
    evaluate_fid,
    generate_images,
    shard_batches,
)

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = """import sys
from pathlib import Path

import torch
from accelerate import Accelerator

torch.set_num_threads(1)
from helpers_fid import evaluate_everything

evaluate_everything(Accelerator(cpu=True), Path(sys.argv[1]), Path(sys.argv[2]))
"""


def _fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The textbook Fréchet distance of two feature sets (float64, eigenvalues of the covariance product)."""
    r, f = real.double().numpy(), fake.double().numpy()
    mu_r, mu_f = r.mean(0), f.mean(0)
    cov_r, cov_f = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_r @ cov_f).real.clip(min=0)).sum()
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * trace_sqrt)


def test_streamed_fid_equals_all_at_once():
    extractor, real = moments_extractor(), real_images()
    pipe = TintedNoisePipe()
    fake = generate_images(pipe, captions(), SETTINGS)  # (N, 3, 8, 8): every image held at once
    at_once = fid_report(real, fake, extractor, batch_size=NUM_IMAGES)  # one feature batch per set
    streamed = evaluate_fid(pipe, captions(), lazy(real), extractor, "synthetic", SETTINGS)  # batches of 8
    by_batches = fid_report(iter(real.split(5)), iter(fake.split(7)), extractor, batch_size=3)
    textbook = _fid_from_features(extractor(real), extractor(fake))
    assert at_once["fid"] > 0.01
    assert streamed["fid"] == pytest.approx(at_once["fid"], rel=1e-6)
    assert by_batches["fid"] == pytest.approx(at_once["fid"], rel=1e-6)
    assert at_once["fid"] == pytest.approx(textbook, rel=1e-4)
    assert streamed["num_real"] == streamed["num_fake"] == NUM_IMAGES
    assert streamed["reference"] == "synthetic" and streamed["steps"] == SETTINGS.steps


def test_fid_real_stats_cache_skips_reading_the_real_images(tmp_path):
    extractor, pipe = moments_extractor(), TintedNoisePipe()

    def unreadable(i):
        raise AssertionError("real images read although their statistics are cached")

    first = evaluate_fid(pipe, captions(), lazy(real_images()), extractor, "synthetic", SETTINGS,
                         real_stats_cache=tmp_path)
    assert len(list(tmp_path.glob("*synthetic-n48*.safetensors"))) == 1
    cached = evaluate_fid(pipe, captions(), LazyImages(unreadable, NUM_IMAGES), extractor, "synthetic", SETTINGS,
                          real_stats_cache=tmp_path)
    assert cached == first
    fake = generate_images(pipe, captions(), SETTINGS)
    assert compute_fid(None, fake, extractor, real_stats_cache=tmp_path, cache_key="synthetic-n48") == pytest.approx(
        first["fid"], rel=1e-6)


def test_lazy_images_slice_like_a_tensor_and_shards_cover_the_set():
    real = real_images(10)
    images = lazy(real)
    assert len(images) == 10 and torch.equal(images[3:7], real[3:7]) and images[9:12].shape[0] == 1
    with pytest.raises(TypeError):
        images[0]

    class Rank:  # what shard_batches reads of an accelerator
        def __init__(self, index):
            self.process_index, self.num_processes = index, 2

    parts = [list(shard_batches(images, 3, Rank(r))) for r in range(2)]
    assert [b.shape[0] for b in parts[0]] == [3, 2] and [b.shape[0] for b in parts[1]] == [3, 2]
    assert torch.equal(torch.cat(parts[0] + parts[1]), real)


def test_streamed_adherence_equals_all_at_once():
    from diffdis.eval.adherence import adherence_prompts
    from diffdis.eval.reference import AttributeClassifier

    torch.manual_seed(0)
    classifier = AttributeClassifier(resolution=16).eval()
    pipe = TintedNoisePipe()
    prompts = adherence_prompts(2, seed=None)
    everything = generate_images(pipe, [p["prompt"] for p in prompts], SETTINGS)  # (72, 3, 8, 8)
    shape_ids, colour_ids = [p["shape_id"] for p in prompts], [p["colour_id"] for p in prompts]
    expected = prompt_adherence(everything, shape_ids, colour_ids, classifier)
    metrics, grid_images, grid_prompts = evaluate_adherence(pipe, classifier, 2, SETTINGS)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert metrics["adherence/colour_pixel"] > 0.9  # the tint is found: the counts are not trivially zero
    assert grid_images.shape == (36, 3, 8, 8) and len(grid_prompts) == 36
    assert torch.equal(grid_images, everything[::2])  # the first of the two images of each combination
    full = adherence_grid(everything, prompts)
    assert np.array_equal(np.array(adherence_grid(grid_images, grid_prompts)), np.array(full))


@pytest.mark.slow
def test_two_processes_sum_states_and_match_one_process(tmp_path):
    single_dir, multi_dir = tmp_path / "one", tmp_path / "two"
    single_dir.mkdir(), multi_dir.mkdir()
    expected = evaluate_everything(None, single_dir, tmp_path / "cache_one")
    script = tmp_path / "evaluate_two.py"
    script.write_text(LAUNCHER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()]
    proc = subprocess.run(launch + [str(script), str(multi_dir), str(tmp_path / "cache_two")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((multi_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert got["num_processes"] == 2
        assert got["fid"]["fid"] == pytest.approx(expected["fid"]["fid"], rel=1e-4)
        assert got["fid_cached"]["fid"] == pytest.approx(expected["fid"]["fid"], rel=1e-4)
        assert got["fid_report"]["fid"] == pytest.approx(expected["fid"]["fid"], rel=1e-4)
        assert got["fid_report"]["num_fake"] == got["fid_report"]["num_real"] == NUM_IMAGES
        settings = {k: v for k, v in got["fid"].items() if k != "fid"}
        assert settings == {k: v for k, v in expected["fid"].items() if k != "fid"}
        assert got["adherence"] == expected["adherence"] and got["grid_prompts"] == expected["grid_prompts"]
        # each process fed only its half into the metric; the report counts both halves: summed states
        assert got["fid_calls"]["fake_images"] == got["fid_calls"]["real_images"] == NUM_IMAGES // 2
        assert got["fid_cached_calls"]["fake_images"] == NUM_IMAGES // 2 and got["fid_cached_calls"]["real_images"] == 0
        assert got["fid"]["num_fake"] == got["fid"]["num_real"] == NUM_IMAGES
        assert got["fid_report_calls"]["fake_images"] == got["fid_report_calls"]["real_images"] == NUM_IMAGES // 2
        for calls in (got["fid_calls"], got["fid_cached_calls"], got["fid_report_calls"]):
            assert calls["all_reduce"] > 0 and all(calls[g] == 0 for g in GATHERS), calls
    assert expected["fid_calls"]["all_reduce"] == 0  # one process: nothing to synchronise
    assert torch.equal(torch.load(multi_dir / "grid0.pt"), torch.load(single_dir / "grid0.pt"))
    assert torch.equal(torch.load(multi_dir / "grid1.pt"), torch.load(single_dir / "grid0.pt"))
    assert list((tmp_path / "cache_two").glob("*.safetensors")), "the main process writes the real-statistics cache"
