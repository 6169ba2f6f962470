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
    assert sorted(f"eval/{k}" for k in evaluator.metric_names()) == sorted(ADHERENCE + ZEROSHOT)
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


def test_evaluation_settings_that_cannot_work_are_config_errors(tmp_path):
    load_config(None, ["train.eval_every=10", "data.name=some/hub-dataset"])  # any data: the grid uses its captions
    for override, message in (
        (f"train.validation_prompts={tmp_path / 'missing.txt'}", "is not a file"),
        ("train.validation_prompts=[]", "holds no prompt"),
        ("train.validation_prompts=3", "must be a list of prompts or a file"),
        (f"train.eval_zeroshot.classnames={tmp_path / 'nope.txt'}", "train.eval_zeroshot.classnames"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["train.eval_every=10", override])
    with pytest.raises(ConfigError, match="needs data.validation_split"):
        load_config(None, ["train.eval_every=10", "data.name=some/hub-dataset", "data.validation_split=null",
                           "train.eval_retrieval_samples=8"])
    with pytest.raises(ConfigError, match="eval_steps"):
        load_config(None, ["train.eval_steps=0"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n")
    from diffdis.config import validation_prompts

    assert validation_prompts(load_config(None, [f"train.validation_prompts={prompts}"])) == ["a red circle", "a blue square"]
    assert validation_prompts(load_config(None, ["train.validation_prompts=[a b, c]"])) == ["a b", "c"]


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """An image-caption folder with train and validation splits, and a labelled folder of class subfolders."""
    from helpers_data import write_imagefolder
    from PIL import Image

    root = tmp_path_factory.mktemp("user_data")
    write_imagefolder(root / "captions" / "train", 24)
    write_imagefolder(root / "captions" / "validation", 12)
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / "labelled" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), colour).save(root / "labelled" / label / f"{i}.png")
    return root


def test_evaluator_on_a_users_own_data(user_data, tmp_path):
    """Prompts grid, zero-shot on a labelled folder and retrieval on the validation captions, no adherence."""
    from helpers_data import caption

    overrides = TINY_TRAIN_OVERRIDES + EVAL_OVERRIDES + [
        f"data.name={user_data / 'captions'}", "train.eval_every=2", "train.validation_prompts=[a red circle, a blue circle]",
        f"train.eval_zeroshot.dataset={user_data / 'labelled'}", "train.eval_retrieval_samples=10"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    components = build_components(cfg, [caption(i) for i in range(24)] + ["a red circle", "a blue circle", "a photo of a"])
    evaluator = TrainingEvaluator.from_config(cfg)
    assert evaluator.classifier is None  # adherence is for the procedural data only
    metrics, grid = _evaluate(evaluator, components)
    retrieval = [f"eval/{w}_retrieval_recall@{k}" for w in ("image", "text") for k in (1, 5, 10)]
    assert set(metrics) == {"eval/zeroshot_labelled", *retrieval, "eval/seconds"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ["eval/zeroshot_labelled", *retrieval])
    assert grid is not None and grid.width >= 2 * cfg.data.resolution
    assert len(evaluator.retrieval_data[1]) == 10 and evaluator.retrieval_data[1][0] == [caption(0)]
    # without prompts the grid shows the first validation captions
    cfg = load_config(None, overrides[:-3] + ["train.eval_grid_size=3"])
    plan = TrainingEvaluator.from_config(cfg).plan
    assert plan.grid_prompts == tuple(caption(i) for i in range(3)) and plan.zeroshot_samples == 0


def test_next_commands_come_from_the_runs_data(user_data, tmp_path):
    from helpers_data import caption

    from diffdis.cli.train import next_commands

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    (model / "zeroshot_index.json").write_text("{}")
    lines = next_commands(load_config(None, [f"data.name={user_data / 'captions'}"]), model)
    assert lines[0] == f"python tools/sample.py {model} --prompt '{caption(0)}' --prompt '{caption(1)}'"
    assert "--dataset <labelled folder or hub id>" in lines[1] and len(lines) == 2
    lines = next_commands(load_config(None, [f"train.eval_zeroshot.dataset={user_data / 'labelled'}", "data.name=embedded"]), model)
    assert f"--dataset {user_data / 'labelled'} --task auto" in lines[1] and lines[2] == f"python tools/evaluate.py {model}"


def _history(out: Path):
    return [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]


def _eval_steps(rows, keys):
    return sorted(r["step"] for r in rows if all(k in r for k in keys))


def test_stop_at_targets_are_checked(tiny_run):
    cfg, _ = tiny_run
    evaluator = TrainingEvaluator.from_config(load_config(None, TINY_TRAIN_OVERRIDES + EVAL_OVERRIDES + [
        "train.eval_every=2", "train.stop_at={zeroshot_shape: 0.9, adherence_colour: 1.0}"]), classifier=AttributeClassifier(resolution=16))
    assert evaluator.reached({"eval/zeroshot_shape": 0.95, "eval/adherence_colour": 1.0, "eval/seconds": 3.0})
    assert not evaluator.reached({"eval/zeroshot_shape": 0.85, "eval/adherence_colour": 1.0})
    assert not evaluator.reached({"eval/zeroshot_shape": 0.95})  # a figure not given is not reached
    plain = TrainingEvaluator.from_config(cfg, classifier=AttributeClassifier(resolution=16))
    assert not plain.reached({"eval/zeroshot_shape": 1.0}), "no targets: never stops early"
    with pytest.raises(ConfigError, match="zeroshot_cifar10.*it gives: adherence_shape"):
        TrainingEvaluator.from_config(load_config(None, TINY_TRAIN_OVERRIDES + EVAL_OVERRIDES + [
            "train.eval_every=2", "train.stop_at={zeroshot_cifar10: 0.5}"]), classifier=AttributeClassifier(resolution=16))
    with pytest.raises(ConfigError, match="train.stop_at needs train.eval_every"):
        load_config(None, ["train.stop_at={zeroshot_shape: 0.9}"])
    with pytest.raises(ConfigError, match="train.stop_at is empty"):
        load_config(None, ["train.eval_every=10", "train.stop_at={}"])


@pytest.mark.slow
def test_trainer_logs_evaluation(tmp_path, tiny_overrides, one_thread_runs):
    out = tmp_path / "run"
    accelerate(tiny_overrides + EVAL_OVERRIDES + [f"train.output_dir={out}", "train.max_steps=4", "train.eval_every=2",
                                                  "train.validation_every=0", "train.checkpointing_steps=0",
                                                  "train.stop_at={adherence_shape: 1.01}"])  # never met: all 4 steps
    rows = _history(out)
    assert _eval_steps(rows, ADHERENCE + ZEROSHOT) == [2, 4]
    seconds = [r["eval/train_seconds"] for r in rows if "eval/train_seconds" in r]
    assert len(seconds) == 2 and 0 < seconds[0] < seconds[1]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["stopped_at_target_step"] is None
    assert 0 < summary["train_seconds"] < summary["train_loop_seconds"], "evaluation time is not training time"
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ADHERENCE + ZEROSHOT if k in r)
    assert (out / "eval_samples" / "step-2.png").is_file() and (out / "eval_samples" / "step-4.png").is_file()
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert any(b"eval/samples" in e.read_bytes() for e in events), "grid image missing from tensorboard"
    assert any(b"eval/zeroshot_shape" in e.read_bytes() for e in events)


@pytest.mark.slow
def test_trainer_evaluation_sharded_over_two_processes(tmp_path, tiny_overrides, one_thread_runs):
    out = tmp_path / "ddp"
    accelerate(tiny_overrides + EVAL_OVERRIDES + [f"train.output_dir={out}", "train.max_steps=6", "train.eval_every=2",
                                                  "train.validation_every=0", "train.checkpointing_steps=0",
                                                  "train.stop_at={zeroshot_colour: 0.0}"], num_processes=2)  # met at once
    assert _eval_steps(_history(out), ADHERENCE + ZEROSHOT) == [2]
    assert (out / "eval_samples" / "step-2.png").is_file()
    summary = json.loads((out / "train_summary.json").read_text())  # both processes stopped at the first evaluation
    assert summary["global_step"] == 2 and summary["stopped_at_target_step"] == 2
    assert (out / "model").is_dir()


@pytest.mark.slow
def test_two_processes_evaluate_a_users_own_data(tmp_path, tiny_overrides, user_data, one_thread_runs):
    out = tmp_path / "own"
    accelerate(tiny_overrides + EVAL_OVERRIDES + [
        f"train.output_dir={out}", f"data.name={user_data / 'captions'}", "train.max_steps=2", "train.eval_every=2",
        "train.validation_every=0", "train.checkpointing_steps=0", "train.validation_prompts=[a red circle, a blue circle]",
        f"train.eval_zeroshot.dataset={user_data / 'labelled'}", "train.eval_retrieval_samples=10"], num_processes=2)
    keys = ["eval/zeroshot_labelled", "eval/image_retrieval_recall@1", "eval/text_retrieval_recall@5"]
    assert _eval_steps(_history(out), keys) == [2]
    assert (out / "eval_samples" / "step-2.png").is_file()
