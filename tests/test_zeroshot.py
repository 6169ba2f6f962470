"""Tests of zero-shot inference (text-query sampler), its metrics, the diffusion classifier and the zero-shot command."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from diffdis.data.embedded import COLOURS, SHAPES, caption_for  # noqa: E402
from diffdis.eval import zeroshot as zs  # noqa: E402
from diffdis.models.components import encode_text  # noqa: E402
from diffdis.models.dual_stream_unet import DualStreamUNet  # noqa: E402
from diffdis.pipelines.zeroshot import TextQuerySampler, diffusion_classifier_logits, tokenize  # noqa: E402
from diffdis.pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline, load_zero_shot_pipeline  # noqa: E402
from diffdis.schedule import text_forward  # noqa: E402

from helpers_tiny import CONTEXT_DIM, tiny_text_encoder, tiny_tokenizer, tiny_unet  # noqa: E402

SCHED = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def _tool():
    from diffdis.cli import zeroshot

    return zeroshot


def _dual(fusion: str, seed: int = 0) -> DualStreamUNet:
    """A tiny dual-stream UNet with every weight perturbed (FC_out is zero at init, which would hide bugs)."""
    model = DualStreamUNet.from_unet(tiny_unet(sample_size=8), text_dim=CONTEXT_DIM, fusion=fusion).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.new_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def text_parts():
    tok = tiny_tokenizer()
    return tok, tiny_text_encoder(tok, with_projection=True)


def _empty_context(text_parts) -> torch.Tensor:
    tok, enc = text_parts
    with torch.no_grad():
        return encode_text(enc, tokenize(tok, [""], "cpu"))[0]


# ---------------------------------------------------------------------------- templates and classifier
def test_builtin_tasks_have_expected_sizes():
    sizes = {"cifar10": (10, 18), "cifar100": (100, 18), "stl10": (10, 2), "pets": (37, 1), "flowers": (102, 1),
             "food101": (101, 1), "imagenet1k": (1000, 80), "shape": (6, 9), "colour": (6, 9), "colour_shape": (36, 2)}
    for name, (n_cls, n_tmpl) in sizes.items():
        names, templates = zs.load_task(name)
        assert (len(names), len(templates)) == (n_cls, n_tmpl), name
    assert zs.load_task("shape")[0] == list(SHAPES) and zs.load_task("colour")[0] == list(COLOURS)
    # embedded prompts use only caption words, so the trained tokenizer knows them
    vocab = {w for s in SHAPES for c in COLOURS for p in range(6) for w in caption_for(s, c, "small", "left", p).replace(",", " ").split()}
    for task in zs.EMBEDDED_TASKS:
        names, templates = zs.load_task(task)
        for t in templates:
            assert set(t.format(names[0]).split()) <= vocab, (task, t)
    with pytest.raises(zs.TemplateError):
        zs.load_task("nope")


def _text_fn(tok, enc):
    """texts -> normalised text queries (N, d), as a zero-shot pipeline's ``encode_text``."""
    return lambda texts: encode_text(enc, tokenize(tok, list(texts), "cpu"))[1]


def test_classifier_shape_normalisation_and_template_average(text_parts):
    tok, enc = text_parts
    names, templates = ["red circle", "blue square", "green star"], ["a {}", "a photo of a {}"]
    weights = zs.build_zero_shot_classifier(_text_fn(tok, enc), names, templates)
    assert weights.shape == (CONTEXT_DIM, 3)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(3))
    q = _text_fn(tok, enc)([t.format(n) for n in names for t in templates]).view(3, 2, -1)
    torch.testing.assert_close(weights, F.normalize(q.mean(1), dim=-1).T)
    single = zs.build_zero_shot_classifier(_text_fn(tok, enc), names, templates[:1])
    torch.testing.assert_close(single, q[:, 0].T)


def test_max_ensemble_scores_each_class_by_its_best_template(text_parts):
    tok, enc = text_parts
    names, templates = ["circle", "square"], ["a red {}", "a blue {}", "a green {}"]
    weights = zs.build_zero_shot_classifier(_text_fn(tok, enc), names, templates, ensemble="max")
    assert weights.shape == (CONTEXT_DIM, 2, 3)
    q = _text_fn(tok, enc)([t.format(n) for n in names for t in templates]).view(2, 3, -1)
    feats = F.normalize(torch.randn(5, CONTEXT_DIM, generator=torch.Generator().manual_seed(0)), dim=-1)
    expected = torch.einsum("nd,ctd->nct", feats, F.normalize(q, dim=-1)).amax(-1)  # (5, 2)
    torch.testing.assert_close(zs.class_logits(feats, weights), expected)
    # an image equal to one template's query is classified as that template's class, whatever the others say
    hit = zs.evaluate_zero_shot(F.normalize(q[1, 2:3], dim=-1), torch.tensor([1]), weights)
    assert hit["acc1"] == 1.0
    assert zs.task_ensemble("shape") == "max" and zs.task_ensemble("colour") == "max"
    assert zs.task_ensemble("cifar10") == "mean" and zs.task_ensemble("my_folder") == "mean"
    with pytest.raises(ValueError, match="ensemble"):
        zs.build_zero_shot_classifier(_text_fn(tok, enc), names, templates, ensemble="median")


# ---------------------------------------------------------------------------- metrics
def test_evaluate_zero_shot_hand_computed():
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4],  # label 0: top-1 hit
        [9.0, 8, 7, 6, 5, 4],  # label 4: top-5 hit only
        [0.0, 9, 1, 2, 3, 4],  # label 5: top-1 miss (pred 1), top-5 hit
        [0.0, 1, 9, 2, 3, 4],  # label 2: hit
        [9.0, 8, 7, 6, 5, 4],  # label 5: miss both
    ])
    labels = torch.tensor([0, 4, 5, 2, 5])
    m = zs.evaluate_zero_shot(logits, labels)
    assert m["acc1"] == pytest.approx(2 / 5)
    assert m["acc5"] == pytest.approx(4 / 5)
    # classes present: 0 (1/1), 2 (1/1), 4 (0/1), 5 (0/2)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    cm = m["confusion_matrix"]
    assert cm.shape == (6, 6) and cm.sum() == 5 and cm[5, 0] == 1 and cm[5, 1] == 1 and cm[4, 0] == 1
    feats, classifier = torch.eye(3), torch.eye(3)[:, [2, 0, 1]]
    m3 = zs.evaluate_zero_shot(feats, torch.tensor([1, 2, 0]), classifier)
    assert m3["acc1"] == 1.0 and "acc5" not in m3


def test_retrieval_metrics_hand_computed():
    images = torch.eye(3)
    texts = F.normalize(torch.tensor([[1.0, 0.1, 0], [0.2, 1, 0], [1.0, 0, 0.5], [0, 1.0, 0.1]]), dim=-1)
    index = torch.tensor([0, 1, 2, 2])  # captions 2 and 3 belong to image 2
    m = zs.retrieval_metrics(images, texts, index, recall_k=(1, 2))
    # text -> image: text0 top image0 (hit), text1 image1 (hit), text2 image0 (miss@1, image2 @2), text3 image1 (miss, image2 @2)
    assert m["image_retrieval_recall@1"] == pytest.approx(0.5)
    assert m["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image -> texts: image0 best text2 (miss) then text0 (hit@2); image1 text1 (hit); image2 text2 (hit)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)


def test_confusion_png(tmp_path):
    zs.save_confusion_matrix_png(torch.tensor([[3, 1], [0, 2]]), ["a", "b"], tmp_path / "cm.png")
    assert Image.open(tmp_path / "cm.png").size[0] > 0


# ---------------------------------------------------------------------------- sampler
def test_sampler_deterministic_and_batch_independent(text_parts):
    sampler = TextQuerySampler(_dual("joint"), SCHED.config, _empty_context(text_parts), text_scale=0.7)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    a = sampler(x, 3, guidance=1.5, num_noise_samples=2, generator=gens([0, 1, 2]))
    b = sampler(x, 3, guidance=1.5, num_noise_samples=2, generator=gens([0, 1, 2]))
    assert a.shape == (3, CONTEXT_DIM)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    assert torch.equal(a, b)
    torch.testing.assert_close(sampler(x[1:], 3, 1.5, 2, generator=gens([1, 2])), a[1:])
    assert not torch.allclose(sampler(x, 3, 1.5, 2, generator=gens([5, 6, 7])), a)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_one_way_cached_equals_uncached(text_parts, guidance):
    unet, ctx = _dual("one_way"), _empty_context(text_parts)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    cached = TextQuerySampler(unet, SCHED.config, ctx, 0.5)
    plain = TextQuerySampler(unet, SCHED.config, ctx, 0.5, use_cache=False)
    assert cached.cached and not plain.cached
    out_c = cached(x, 4, guidance, 2, generator=torch.Generator().manual_seed(3))
    out_p = plain(x, 4, guidance, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_c, out_p, atol=1e-5, rtol=1e-5)


class _Oracle(torch.nn.Module):
    """Stands in for the UNet: returns the true e0 (or the true noise) whatever the input."""

    def __init__(self, e0: torch.Tensor, noise: torch.Tensor, prediction_type: str):
        super().__init__()
        self.e0, self.noise = e0, noise
        self.config = SimpleNamespace(text_prediction_type=prediction_type, fusion="joint", text_dim=e0.shape[1])
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward_text(self, e_t, t_e, image, ctx, t_img):
        truth = self.e0 if self.config.text_prediction_type == "sample" else self.noise
        return truth.repeat(e_t.shape[0] // truth.shape[0], 1)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_text_scale_conversion_recovers_e0(prediction_type):
    gamma, steps = 0.4, 8
    e0 = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    noise = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    sampler = TextQuerySampler(_Oracle(e0, noise, prediction_type), SCHED.config, torch.zeros(1, 4, 8), text_scale=gamma)
    trace, alphas = [], SCHED.alphas_cumprod
    e_T = text_forward(e0, noise, torch.full((2,), 999), alphas, gamma)  # consistent with the oracle's noise
    out = sampler(torch.zeros(2, 3, 8, 8), steps, noise=e_T, callback=trace.append)
    timesteps = sampler.scheduler.timesteps.tolist()
    assert timesteps[0] == 999 and len(trace) == steps
    for step, nxt in zip(trace[:-1], timesteps[1:]):  # DDIM with an exact model follows the training forward process
        expected = text_forward(e0, noise, torch.full((2,), nxt), alphas, gamma)
        torch.testing.assert_close(step["x"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trace[-1]["x"] / gamma, e0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, e0, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- diffusion classifier
class _PromptDenoiser(torch.nn.Module):
    """A UNet whose class prompt (context) holds a guess of the clean image; it predicts the noise implied by it."""

    def __init__(self, scheduler: DDPMScheduler):
        super().__init__()
        self.alphas = scheduler.alphas_cumprod
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    device = _Oracle.device
    dtype = _Oracle.dtype

    def forward(self, x, t, ctx):
        a = self.alphas[t].view(-1, 1, 1, 1)
        guess = ctx[:, 0, :4].view(-1, 1, 2, 2)  # (B, 1, 2, 2)
        return SimpleNamespace(sample=(x - a.sqrt() * guess) / (1 - a).sqrt())


def test_diffusion_classifier_picks_the_right_class():
    g = torch.Generator().manual_seed(0)
    guesses = torch.randn(5, 1, 4, generator=g)  # one clean-image guess per class
    contexts = torch.cat([guesses, torch.zeros(5, 1, 4)], dim=1)  # (K=5, L=2, d=4)
    images = guesses[[3, 1, 4], 0].view(3, 1, 2, 2) + 0.01 * torch.randn(3, 1, 2, 2, generator=g)
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    logits = diffusion_classifier_logits(_PromptDenoiser(sched), images, contexts, sched, num_timesteps=4, generator=g, class_batch_size=2)
    assert logits.shape == (3, 5)
    assert logits.argmax(1).tolist() == [3, 1, 4]
    assert zs.evaluate_zero_shot(logits, torch.tensor([3, 1, 4]))["acc1"] == 1.0



class _CountingDenoiser(_PromptDenoiser):
    """:class:`_PromptDenoiser` that counts the (image, class) pairs it scores, per timestep."""

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.pairs = 0
        self.per_t = {}

    def forward(self, x, t, ctx):
        self.pairs += x.shape[0]
        self.per_t[int(t[0])] = self.per_t.get(int(t[0]), 0) + x.shape[0]
        return super().forward(x, t, ctx)


def _dc_case(k: int = 12, b: int = 6, noise: float = 0.5):
    g = torch.Generator().manual_seed(1)
    guesses = torch.randn(k, 1, 4, generator=g)
    contexts = torch.cat([guesses, torch.zeros(k, 1, 4)], dim=1)  # (K, L=2, d=4)
    labels = torch.randint(0, k, (b,), generator=g)
    images = guesses[labels, 0].view(b, 1, 2, 2) + noise * torch.randn(b, 1, 2, 2, generator=g)
    return contexts, images, labels, DDPMScheduler(num_train_timesteps=1000, clip_sample=False)


def test_adaptive_diffusion_classifier_scores_kept_classes_exactly_and_costs_less():
    contexts, images, _, sched = _dc_case()
    full_unet, fast_unet = _CountingDenoiser(sched), _CountingDenoiser(sched)
    full = diffusion_classifier_logits(full_unet, images, contexts, sched, num_timesteps=6,
                                       generator=torch.Generator().manual_seed(0), class_batch_size=5)
    fast = diffusion_classifier_logits(fast_unet, images, contexts, sched, num_timesteps=6,
                                       generator=torch.Generator().manual_seed(0), class_batch_size=5, keep=3,
                                       first_timesteps=2)
    assert full_unet.pairs == 6 * 12 * 6 and fast_unet.pairs == 6 * (12 * 2 + 3 * 4)
    # timesteps 143, 285, ..., 856: the first round is the midpoints of two halves (285, 714), on every class
    assert fast_unet.per_t == {143: 18, 285: 72, 428: 18, 571: 18, 714: 72, 856: 18}
    kept = fast > -1e3  # (B, K): the three classes per image scored at every timestep
    assert kept.sum(1).tolist() == [3] * 6
    torch.testing.assert_close(fast[kept], full[kept])  # same timesteps and noise: the exhaustive logits
    dropped_best = fast.masked_fill(kept, float("-inf")).max(1).values
    assert (fast[kept].view(6, 3).min(1).values > dropped_best).all()  # every dropped class ranks below the kept


def test_adaptive_diffusion_classifier_keeping_every_class_is_exhaustive():
    contexts, images, labels, sched = _dc_case(noise=0.01)
    args = dict(num_timesteps=4, class_batch_size=64)
    full = diffusion_classifier_logits(_PromptDenoiser(sched), images, contexts, sched,
                                       generator=torch.Generator().manual_seed(0), **args)
    same = diffusion_classifier_logits(_PromptDenoiser(sched), images, contexts, sched,
                                       generator=torch.Generator().manual_seed(0), keep=12, first_timesteps=1, **args)
    fast = diffusion_classifier_logits(_PromptDenoiser(sched), images, contexts, sched,
                                       generator=torch.Generator().manual_seed(0), keep=2, first_timesteps=1, **args)
    torch.testing.assert_close(same, full)
    assert full.argmax(1).tolist() == labels.tolist() and fast.argmax(1).tolist() == labels.tolist()
    with pytest.raises(ValueError, match="first_timesteps"):
        diffusion_classifier_logits(_PromptDenoiser(sched), images, contexts, sched, keep=2, first_timesteps=5, **args)

# ---------------------------------------------------------------------------- diffdis.cli.zeroshot (tools/zeroshot.py)
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text_parts):
    folder = tmp_path_factory.mktemp("zs_model")
    tok, enc = text_parts
    DiffDisZeroShotPipeline(unet=_dual("one_way"), text_encoder=enc, tokenizer=tok,
                            scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False), text_scale=0.8,
                            num_inference_steps=3, resolution=8).save_pretrained(folder)
    return folder


def test_tool_embedded_writes_results(model_dir, tmp_path):
    out = tmp_path / "out"
    rc = _tool().main([str(model_dir), "--task", "all", "--num-samples", "6", "--steps", "2", "--guidance", "1",
                       "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and res["guidance"] == 1.0 and res["model"] == str(model_dir)
    assert set(res["results"]) == {"shape", "colour", "colour_shape"}
    assert res["results"]["colour_shape"]["chance"] == pytest.approx(1 / 36)
    assert 0 <= res["results"]["shape"]["metrics"]["acc1"] <= 1
    assert (out / "confusion_shape.png").is_file()


def test_tool_retrieval(model_dir, tmp_path):
    out = tmp_path / "r"
    assert _tool().main([str(model_dir), "--task", "retrieval", "--num-samples", "4", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["results"]["retrieval"]["metrics"]
    assert metrics["image_retrieval_recall@10"] == 1.0 and "text_retrieval_recall@1" in metrics


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / label).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(root / label / f"{i}.png")
    return root


def test_tool_image_folder_and_diffusion_classifier(model_dir, class_folder, tmp_path):
    tmpl = tmp_path / "t.txt"
    tmpl.write_text("a {} square\n")
    out = tmp_path / "f"
    rc = _tool().main([str(model_dir), "--dataset", str(class_folder), "--templates", str(tmpl), "--method",
                       "diffusion_classifier", "--dc-timesteps", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    (task,) = res.values()
    assert task["classnames"] == ["blue", "red"] and task["metrics"]["num_samples"] == 4


def _bad(argv, capsys) -> str:
    assert _tool().main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (weight-loading progress bars may precede it)
    assert err.startswith("error:")
    return err


def test_tool_bad_inputs(model_dir, class_folder, tmp_path, capsys):
    plain = tmp_path / "plain"
    tiny_unet(sample_size=8).save_pretrained(plain / "unet")
    assert "no discrimination stream" in _bad([str(plain)], capsys)
    err = _bad([str(model_dir), "--dataset", str(class_folder), "--label-column", "nope"], capsys)
    assert "nope" in err and "label" in err and "image" in err  # lists the existing columns
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    assert "3 class names" in _bad([str(model_dir), "--dataset", str(class_folder), "--classnames", str(names)], capsys)
    assert "empty" in _bad([str(model_dir), "--num-samples", "0"], capsys)


@pytest.fixture(scope="module")
def named_label_folder(tmp_path_factory):
    """An imagefolder whose metadata names each image's class as a string ("colour") and holds a float column."""
    root = tmp_path_factory.mktemp("named_labels")
    rows = []
    for i, (name, rgb) in enumerate((("red", (220, 30, 30)),) * 3 + (("blue", (30, 30, 220)),)):
        Image.new("RGB", (8, 8), rgb).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "colour": name, "score": 0.5 * i}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_tool_string_label_column_is_a_one_line_error_naming_column_and_type(model_dir, named_label_folder, capsys):
    err = _bad([str(model_dir), "--dataset", str(named_label_folder), "--label-column", "colour"], capsys)
    assert "'colour'" in err and "string" in err and "integer class ids" in err and "--classnames" in err
    err = _bad([str(model_dir), "--dataset", str(named_label_folder), "--label-column", "score"], capsys)
    assert "'score'" in err and "float" in err and "integer class ids" in err


def test_tool_maps_string_labels_to_the_given_class_names(model_dir, named_label_folder, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("red\n")
    err = _bad([str(model_dir), "--dataset", str(named_label_folder), "--label-column", "colour", "--classnames", str(names)], capsys)
    assert "'colour'" in err and "'blue'" in err and "1 class names" in err
    names.write_text("blue\nred\n")
    out = tmp_path / "named"
    rc = _tool().main([str(model_dir), "--dataset", str(named_label_folder), "--label-column", "colour", "--classnames", str(names),
                       "--method", "diffusion_classifier", "--dc-timesteps", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    (task,) = json.loads((out / "results.json").read_text())["results"].values()
    assert task["classnames"] == ["blue", "red"] and task["metrics"]["num_samples"] == 4
    assert [sum(row) for row in task["confusion_matrix"]] == [1, 3]  # one blue image (class 0), three red (class 1)


def test_api_scores_images_in_memory_as_the_dataset_they_came_from(model_dir):
    """Evaluation during training passes a pixel tensor, the command a dataset read on demand: same numbers."""
    from diffdis.eval.api import ZeroShotSettings, load_zero_shot_tasks, zero_shot
    model = load_zero_shot_pipeline(model_dir)
    images, tasks = load_zero_shot_tasks("embedded", "all", num_samples=6, resolution=model.resolution)
    settings = ZeroShotSettings(steps=2, batch_size=4)
    from_dataset = zero_shot(model, tasks, images, settings)
    from_tensor = zero_shot(model, tasks, images[list(range(len(images)))], settings)  # (6, 3, R, R)
    assert set(from_dataset) == {"shape", "colour", "colour_shape"}
    for task in tasks:
        a, b = from_dataset[task]["metrics"], from_tensor[task]["metrics"]
        assert a["acc1"] == b["acc1"] and torch.equal(a["confusion_matrix"], b["confusion_matrix"])
