"""Evaluation during training: the evaluator on tiny components, and the trainer logging it (1 and 2 processes)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_OVERRIDES
from helpers_train import accelerate

from diffdis import methods
from diffdis.config import ConfigError, load_config
from diffdis.data.embedded import COLOURS, SHAPES, make_embedded_dataset
from diffdis.eval.reference import AttributeClassifier
from diffdis.train.build import build_components, caption_corpus
from diffdis.train.evaluation import TrainingEvaluator

EVAL_OVERRIDES = ["train.eval_zeroshot_samples=8", "train.eval_steps=2", "zeroshot.steps=2", "train.eval_batch_size=16"]
ADHERENCE = ["eval/adherence_shape", "eval/adherence_colour", "eval/adherence_both", "eval/adherence_colour_pixel"]
ZEROSHOT = ["eval/zeroshot_shape", "eval/zeroshot_colour", "eval/zeroshot_colour_shape"]
UPSCALE = 4  # adherence_grid's default




@pytest.fixture
def one_thread_runs(monkeypatch):
    """Launched runs use one intra-op thread too (accelerate reads OMP_NUM_THREADS): 2 threads spin on a busy CPU."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def tiny_run():
    """(config, components) of the tiny trainer configuration, with evaluation on."""
    cfg = load_config(None, TINY_TRAIN_OVERRIDES + EVAL_OVERRIDES + ["train.eval_every=2"])
    torch.manual_seed(0)
    components = build_components(cfg, caption_corpus(make_embedded_dataset("train", 48)))
    return cfg, components


def _evaluate(evaluator, components):
    return evaluator(None, methods.build(evaluator.cfg, components), components, step=0)


def test_evaluator_keys_ranges_and_grid(tiny_run):
    cfg, c = tiny_run
    torch.manual_seed(0)
    evaluator = TrainingEvaluator.from_config(cfg, classifier=AttributeClassifier(resolution=16))  # random: no cache needed
    c.unet.train()
    c.text_encoder.train()
    rng = torch.get_rng_state()
    metrics, grid = _evaluate(evaluator, c)
    assert set(metrics) == set(ADHERENCE + ZEROSHOT + ["eval/seconds"])
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for k, v in metrics.items() if k != "eval/seconds")
    # one captioned tile per shape x colour: rows are shapes, columns colours
    r = cfg.data.resolution
    assert grid.width == len(COLOURS) * (r * UPSCALE + 4)
    assert grid.height % len(SHAPES) == 0 and grid.height > len(SHAPES) * r * UPSCALE
    assert c.unet.training and c.text_encoder.training, "train mode must be restored"
    assert torch.equal(torch.get_rng_state(), rng), "evaluation must not consume the training RNG"
    again, _ = _evaluate(evaluator, c)
    assert {k: v for k, v in again.items() if k != "eval/seconds"} == {k: v for k, v in metrics.items() if k != "eval/seconds"}


def test_evaluator_parts_can_be_switched_off(tiny_run):
    cfg, c = tiny_run
    off = load_config(None, TINY_TRAIN_OVERRIDES + EVAL_OVERRIDES + ["train.eval_every=2", "train.eval_adherence_per_combo=0"])
    metrics, grid = _evaluate(TrainingEvaluator.from_config(off), c)
    assert grid is None and set(metrics) == set(ZEROSHOT + ["eval/seconds"])
    gen_only = load_config(None, TINY_TRAIN_OVERRIDES + EVAL_OVERRIDES + ["train.eval_every=2", "loss.lambda_ita=0"])
    metrics, grid = _evaluate(TrainingEvaluator.from_config(gen_only, classifier=AttributeClassifier()), c)
    assert grid is not None and set(metrics) == set(ADHERENCE + ["eval/seconds"])  # untrained text stream: no zero-shot


def test_eval_needs_embedded_data():
    with pytest.raises(ConfigError, match="eval_every"):
        load_config(None, ["train.eval_every=10", "data.name=some/hub-dataset"])
    with pytest.raises(ConfigError, match="eval_steps"):
        load_config(None, ["train.eval_steps=0"])
    load_config(None, ["train.eval_every=0", "data.name=some/hub-dataset"])  # off: any data


def _history(out: Path):
    return [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]


def _eval_steps(rows, keys):
    return sorted(r["step"] for r in rows if all(k in r for k in keys))


@pytest.mark.slow
def test_trainer_logs_evaluation(tmp_path, tiny_overrides, one_thread_runs):
    out = tmp_path / "run"
    accelerate(tiny_overrides + EVAL_OVERRIDES + [f"train.output_dir={out}", "train.max_steps=4", "train.eval_every=2",
                                                  "train.validation_every=0", "train.checkpointing_steps=0"])
    rows = _history(out)
    assert _eval_steps(rows, ADHERENCE + ZEROSHOT) == [2, 4]
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ADHERENCE + ZEROSHOT if k in r)
    assert (out / "eval_samples" / "step-2.png").is_file() and (out / "eval_samples" / "step-4.png").is_file()
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert any(b"eval/samples" in e.read_bytes() for e in events), "grid image missing from tensorboard"
    assert any(b"eval/zeroshot_shape" in e.read_bytes() for e in events)


@pytest.mark.slow
def test_trainer_evaluation_sharded_over_two_processes(tmp_path, tiny_overrides, one_thread_runs):
    out = tmp_path / "ddp"
    accelerate(tiny_overrides + EVAL_OVERRIDES + [f"train.output_dir={out}", "train.max_steps=2", "train.eval_every=2",
                                                  "train.validation_every=0", "train.checkpointing_steps=0"], num_processes=2)
    assert _eval_steps(_history(out), ADHERENCE + ZEROSHOT) == [2]
    assert (out / "eval_samples" / "step-2.png").is_file()
