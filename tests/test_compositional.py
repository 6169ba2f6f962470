"""The compositional dataset, its zero-shot tasks and the pixel scorers of generated images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from diffdis.data.compositional import (
    HELD_OUT,
    PROBE_PAIRS,
    RELATIONS,
    CompositionalError,
    Item,
    inverse_relation,
    make_compositional_dataset,
    render_pair,
)
from diffdis.data.embedded import COLOURS, POSITIONS, SHAPES, SIZES, render_image
from diffdis.eval import compositional as ctasks
from diffdis.eval.objects import ScorerError, adherence, find_objects, score_pair, score_single
from diffdis.eval.tasks import EvaluationError, load_zero_shot_tasks


def _pixels(dataset) -> list[bytes]:
    return [np.asarray(row["image"]).tobytes() for row in dataset]


def _pair(row) -> tuple[Item, str, Item]:
    return Item(row["colour"], row["shape"]), row["relation"], Item(row["colour_b"], row["shape_b"])


# ---------------------------------------------------------------- dataset


def test_deterministic_prefix_stable_and_kinds_interleave() -> None:
    a = make_compositional_dataset("validation", 24, seed=3)
    assert _pixels(a) == _pixels(make_compositional_dataset("validation", 24, seed=3))
    assert a["caption"] == make_compositional_dataset("validation", 24, seed=3)["caption"]
    assert _pixels(make_compositional_dataset("validation", 10, seed=3)) == _pixels(a)[:10]
    assert a["kind"] == ["single", "pair"] * 12
    singles = make_compositional_dataset("validation", 12, seed=3, kind="single")
    pairs = make_compositional_dataset("validation", 12, seed=3, kind="pair")
    assert _pixels(singles) == _pixels(a)[0::2] and _pixels(pairs) == _pixels(a)[1::2]
    assert set(_pixels(a)).isdisjoint(_pixels(make_compositional_dataset("test", 24, seed=3)))
    assert set(_pixels(a)).isdisjoint(_pixels(make_compositional_dataset("validation", 24, seed=4)))
    with pytest.raises(ValueError, match="split"):
        make_compositional_dataset("nope", 2)
    with pytest.raises(CompositionalError, match="kind"):
        make_compositional_dataset("test", 2, kind="triple")


def test_held_out_and_probe_design() -> None:
    # one held-out combination per colour and per shape: every colour and shape is still seen in train
    assert sorted(h.colour for h in HELD_OUT) == sorted(COLOURS)
    assert sorted(h.shape for h in HELD_OUT) == sorted(SHAPES)
    objects = [o for pair in PROBE_PAIRS for o in pair]
    assert Counter(o.colour for o in objects) == Counter({c: 2 for c in COLOURS})
    assert Counter(o.shape for o in objects) == Counter({s: 2 for s in SHAPES})
    assert all(x.colour != y.colour and x.shape != y.shape for x, y in PROBE_PAIRS)
    assert not set(objects) & set(HELD_OUT)


def test_held_out_combinations_never_in_train() -> None:
    train = make_compositional_dataset("train", 1200, seed=0).remove_columns("image")
    shown = set(zip(train["colour"], train["shape"])) | {
        (c, s) for c, s in zip(train["colour_b"], train["shape_b"]) if c is not None
    }
    assert not shown & set(HELD_OUT) and not any(train["heldout"])
    assert len(shown) == len(COLOURS) * len(SHAPES) - len(HELD_OUT)  # every other combination is seen
    test = make_compositional_dataset("test", 240, seed=0).remove_columns("image")
    singles = test.filter(lambda k: k == "single", input_columns="kind")
    assert singles["heldout"] == [True, False] * 60  # every other single-object image is held out
    held = {Item(c, s) for c, s, h in zip(singles["colour"], singles["shape"], singles["heldout"]) if h}
    assert held == set(HELD_OUT)
    pairs = test.filter(lambda k: k == "pair", input_columns="kind")
    assert {frozenset(_pair(r)[::2]) for r in pairs} == {frozenset(p) for p in PROBE_PAIRS}


def test_columns_and_captions_agree() -> None:
    ds = make_compositional_dataset("train", 80, seed=1).remove_columns("image")
    for row in ds:
        assert row["caption"] in row["captions"]
        assert SHAPES[row["shape_id"]] == row["shape"] and COLOURS[row["colour_id"]] == row["colour"]
        if row["kind"] == "single":
            assert row["relation"] is None and row["shape_b"] is None
            assert SIZES[row["size_id"]] == row["size"] and POSITIONS[row["position_id"]] == row["position"]
            continue
        a, relation, b = _pair(row)
        assert row["size"] is None and RELATIONS[row["relation_id"]] == relation
        assert a.colour != b.colour and a.shape != b.shape
        for caption in row["captions"]:
            first, second = (a, b) if caption.find(a.describe()) < caption.find(b.describe()) else (b, a)
            expected = relation if first == a else inverse_relation(relation)
            assert f"{first.describe()} {expected} " in caption and caption.endswith(second.describe())
        assert len(row["captions"][0].split()) + 2 <= 16  # <bos> words <eos> fit the tiny text encoder


# ---------------------------------------------------------------- pixel scorers


@pytest.mark.parametrize("resolution, num", [(16, 120), (32, 24)])
def test_scorers_accept_rendered_images(resolution: int, num: int) -> None:
    """Labels agree with the pixels: every rendered image scores 1 on every criterion, so the two objects
    stay apart and every shape is recognisable at 16 px."""
    ds = make_compositional_dataset("test", num, resolution=resolution, seed=2)
    targets = ds.remove_columns("image").to_list()
    metrics = adherence([np.asarray(row["image"]) for row in ds], targets)
    assert metrics["objects/num_single"] == metrics["objects/num_pair"] == num // 2
    assert all(v == 1.0 for k, v in metrics.items() if not k.startswith("objects/num")), metrics
    for row in ds.select(range(1, num, 2)):
        assert len(find_objects(np.asarray(row["image"]))) == 2


def test_scorers_reject_wrong_images() -> None:
    rng = np.random.default_rng(5)
    for k, (x, y) in enumerate(PROBE_PAIRS):
        for relation in RELATIONS:
            right = np.asarray(render_pair(x, relation, y, 16, rng))
            assert score_pair(right, x, relation, y)["all"]
            assert not score_pair(right, y, relation, x)["relation"]  # the words, objects swapped
            mirrored = np.asarray(render_pair(x, inverse_relation(relation), y, 16, rng))
            assert not score_pair(mirrored, x, relation, y)["relation"]
            other = Item(COLOURS[(COLOURS.index(y.colour) + 1 + k % 4) % 6], y.shape)
            if other.colour == x.colour:
                continue
            wrong_colour = score_pair(np.asarray(render_pair(x, relation, other, 16, rng)), x, relation, y)
            assert not wrong_colour["colours"] and not wrong_colour["relation"] and not wrong_colour["all"]
    image = np.asarray(render_image("ring", "cyan", "small", "left", 16, rng))
    assert score_single(image, "cyan", "ring")["all"]
    assert not score_single(image, "blue", "ring")["colour"] and not score_single(image, "blue", "ring")["shape"]
    assert not score_single(image, "cyan", "circle")["shape"]
    two = np.asarray(render_pair(Item("cyan", "ring"), "above", Item("red", "square"), 16, rng))
    assert not score_single(two, "cyan", "ring")["single"]
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1] works too
    assert score_single(tensor, "cyan", "ring")["all"]


# ---------------------------------------------------------------- zero-shot tasks


@pytest.mark.parametrize("task", ctasks.COMPOSITIONAL_TASKS)
def test_load_zero_shot_tasks(task: str) -> None:
    images, tasks = load_zero_shot_tasks("compositional", task, num_samples=12)
    zs_task = tasks[task]
    assert list(tasks) == [task] and len(images) == 12 and zs_task.labels.shape == (12,)
    assert images[[0, 1]].shape == (2, 3, 16, 16) and -1.0 <= float(images[[0]].min())
    assert 0 <= int(zs_task.labels.min()) and int(zs_task.labels.max()) < len(zs_task.classnames)
    assert all(t.count("{}") == 1 for t in zs_task.templates)
    assert len(zs_task.classnames) == round(1 / ctasks.task_chance(task)["acc1"])
    held_out_ids = {COLOURS.index(h.colour) * len(SHAPES) + SHAPES.index(h.shape) for h in HELD_OUT}
    if task == "heldout_colour_shape":
        assert set(zs_task.labels.tolist()) <= held_out_ids
    if task == "seen_colour_shape":
        assert not set(zs_task.labels.tolist()) & held_out_ids


def test_unknown_task_split_and_pair_are_clear_errors() -> None:
    with pytest.raises(EvaluationError, match="unknown compositional task 'shapez'.*heldout_colour_shape"):
        load_zero_shot_tasks("compositional", "shapez")
    with pytest.raises(EvaluationError, match="no 'all'"):
        load_zero_shot_tasks("compositional", "all")
    with pytest.raises(EvaluationError, match="split"):
        load_zero_shot_tasks("compositional", "size", split="dev", num_samples=2)
    with pytest.raises(EvaluationError, match="train split has no held-out"):
        load_zero_shot_tasks("compositional", "heldout_colour_shape", split="train", num_samples=2)
    with pytest.raises(EvaluationError, match="probe pairs"):
        ctasks.relation_label(Item("red", "circle"), "above", Item("blue", "cross"))
    with pytest.raises(CompositionalError, match="differ in colour"):
        render_pair(Item("red", "circle"), "above", Item("red", "square"))
    with pytest.raises(ScorerError, match="relation"):
        score_pair(np.zeros((16, 16, 3), np.uint8), Item("red", "circle"), "behind", Item("blue", "cross"))
    with pytest.raises(ScorerError, match="image"):
        find_objects(np.zeros((16, 16), np.uint8))


def test_relation_chance_is_known_and_bag_of_words_scores_it() -> None:
    _, tasks = load_zero_shot_tasks("compositional", "relation", num_samples=96)  # two blocks of 48
    task = tasks["relation"]
    assert torch.bincount(task.labels, minlength=24).tolist() == [4] * 24  # balanced: acc1 chance 1/24
    assert ctasks.task_chance("relation") == {"acc1": 1 / 24, "pair_acc": 0.5}
    names = task.classnames
    for g in range(0, len(names), 2):  # the two candidates of a group: same words, different captions
        assert names[g] != names[g + 1] and sorted(names[g].split()) == sorted(names[g + 1].split())

    def bag(text: str) -> torch.Tensor:
        vocab = sorted({w for n in names for w in f"a {n}".split()})
        return torch.tensor([f"a {text}".split().count(w) for w in vocab], dtype=torch.float32)

    text = torch.nn.functional.normalize(torch.stack([bag(n) for n in names]), dim=1)  # (C, V)
    # a bag-of-words model that knows exactly which words describe each image
    oracle_bag = torch.nn.functional.normalize(torch.stack([bag(names[i]) for i in task.labels]), dim=1)
    bow_logits = oracle_bag @ text.T  # (N, C)
    assert ctasks.relation_pair_accuracy(bow_logits, task.labels) == 0.5
    assert float((bow_logits.argmax(1) == task.labels).float().mean()) <= 0.5  # acc1 capped at 0.5 too
    one_hot = torch.nn.functional.one_hot(task.labels, len(names)).float()  # knows word order
    assert ctasks.relation_pair_accuracy(one_hot, task.labels) == 1.0
    assert ctasks.task_metrics("relation", one_hot, task.labels) == {"pair_acc": 1.0}
    assert ctasks.task_metrics("size", one_hot, task.labels) == {}
    random_logits = torch.randn(4000, len(names), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4000) % len(names)
    assert abs(ctasks.relation_pair_accuracy(random_logits, labels) - 0.5) < 0.03


def test_single_object_tasks_are_balanced() -> None:
    _, held = load_zero_shot_tasks("compositional", "heldout_colour_shape", num_samples=60)  # one full block
    assert Counter(held["heldout_colour_shape"].labels.tolist()) == Counter(
        {COLOURS.index(h.colour) * len(SHAPES) + SHAPES.index(h.shape): 10 for h in HELD_OUT}
    )
    data = make_compositional_dataset("test", 120, kind="single").remove_columns("image")
    block = data.select(range(0, 120, 2))  # the held-out stream: sizes and positions balanced
    assert Counter(block["size"]) == Counter({s: 30 for s in SIZES})
    assert Counter(block["position"]) == Counter({p: 12 for p in POSITIONS})


def test_generation_prompts() -> None:
    prompts = ctasks.relation_prompts(num_per_class=2, seed=0)
    assert len(prompts) == 48 and Counter(p["label"] for p in prompts) == Counter({i: 2 for i in range(24)})
    names = ctasks.relation_classnames()
    assert all(p["prompt"] == f"a {names[p['label']]}" for p in prompts)
    held = ctasks.heldout_prompts(seed=None)
    assert [(p["colour"], p["shape"]) for p in held] == [tuple(h) for h in HELD_OUT]


# ---------------------------------------------------------------- training data through the config


def test_training_data_through_the_config() -> None:
    from diffdis.config import load_config
    from diffdis.data import ImageTextCollator
    from diffdis.data.cache import data_source
    from diffdis.models.components import train_tokenizer
    from diffdis.train.build import caption_corpus, load_split

    cfg = load_config(overrides=["data.name=compositional", "data.num_train_samples=400", "data.seed=7"])
    train = load_split(cfg.data, cfg.data.split, num_samples=cfg.data.num_train_samples)
    assert len(train) == 400 and train.features["image"].decode is False
    assert train["caption"][:6] == make_compositional_dataset("train", 6, seed=7)["caption"]
    assert data_source(cfg.data)["seed"] == 7 and data_source(cfg.data)["num_train_samples"] == 400
    te = cfg.model.text_encoder
    tokenizer = train_tokenizer(caption_corpus(train), te.vocab_size, te.max_length)
    batch = ImageTextCollator(tokenizer, resolution=cfg.data.resolution)(list(train.select(range(8))))
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["input_ids"].shape == (8, te.max_length)
    # every zero-shot prompt of every task is in the training vocabulary and fits the text encoder
    prompts = [p["prompt"] for p in ctasks.relation_prompts()]
    for task in ctasks.COMPOSITIONAL_TASKS:
        _, tasks = ctasks.load_compositional_tasks(task, num_samples=2)
        prompts += [t.format(c) for c in tasks[task].classnames for t in tasks[task].templates]
    ids = tokenizer(prompts, padding=False, truncation=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in seq and len(seq) <= te.max_length for seq in ids)


def test_the_evaluation_api_reports_pair_accuracy_for_relations():
    """api.zero_shot adds the relation task's pair accuracy (an image against its own two orders) to its metrics."""
    from helpers_tiny import CONTEXT_DIM, tiny_components

    from diffdis.eval.api import ZeroShotSettings, load_zero_shot_tasks, zero_shot
    from diffdis.models import DualStreamUNet
    from diffdis.pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline

    parts = tiny_components(with_projection=True)
    parts["unet"] = DualStreamUNet.from_unet(parts["unet"], text_dim=CONTEXT_DIM)
    pipe = DiffDisZeroShotPipeline(**parts, num_inference_steps=1)
    images, tasks = load_zero_shot_tasks("compositional", "relation", num_samples=4, resolution=8)
    result = zero_shot(pipe, tasks, images, ZeroShotSettings(batch_size=4))["relation"]["metrics"]
    assert 0.0 <= result["pair_acc"] <= 1.0 and result["num_samples"] == 4
