"""DiffDisMethod's step options: timestep sampling and the share of the batch in the discrimination pass."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffdis.config import ConfigError, load_config
from diffdis.models import DualStreamUNet
from diffdis.config import LossConfig
from diffdis.methods import DiffDisMethod, sample_timesteps
from helpers_tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet


def _times(**options):
    g = torch.Generator().manual_seed(0)
    return sample_timesteps(20000, 1000, g, "cpu", LossConfig(**options))


def test_uniform_timesteps_cover_the_range():
    t = _times()
    assert t.min() == 0 and t.max() == 999
    assert abs(t.float().mean().item() - 499.5) < 10


def test_logit_normal_timesteps_follow_their_mean():
    centred = _times(timestep_sampling="logit_normal")
    noisy = _times(timestep_sampling="logit_normal", timestep_mean=1.0)
    assert 0 <= int(centred.min()) and int(noisy.max()) <= 999
    assert abs(centred.float().mean().item() - 500) < 10
    assert centred.float().std() < _times().float().std()  # concentrated in the middle
    # sigmoid(N(1, 1)) has median sigmoid(1) = 0.731
    assert abs(noisy.float().median().item() - 731) < 10
    same = _times(timestep_sampling="logit_normal", timestep_mean=1.0)
    assert torch.equal(noisy, same)


def test_text_query_timesteps_have_their_own_options():
    g = torch.Generator().manual_seed(0)
    image_side = LossConfig(timestep_sampling="logit_normal", timestep_mean=3.0, text_timestep_sampling="uniform")
    # the image stream's options leave the text query's uniform draw as it was
    assert torch.equal(sample_timesteps(64, 1000, g.manual_seed(0), "cpu", image_side, stream="text"),
                       sample_timesteps(64, 1000, g.manual_seed(0), "cpu", LossConfig()))
    # the default draws the query's t logit-normal with mean -1: median sigmoid(-1) = 0.269
    default = sample_timesteps(20000, 1000, g.manual_seed(0), "cpu", LossConfig(), stream="text")
    assert abs(default.float().median().item() - 269) < 10
    noisy = LossConfig(text_timestep_sampling="logit_normal", text_timestep_mean=3.0, text_timestep_std=0.5)
    t = sample_timesteps(20000, 1000, g.manual_seed(0), "cpu", noisy, stream="text")
    assert abs(t.float().median().item() - 952) < 5  # sigmoid(3) = 0.9526
    assert int(t.max()) <= 999 and int(t.min()) > 600
    assert sample_timesteps(20000, 1000, g.manual_seed(0), "cpu", noisy).float().mean() < 550  # image t stays uniform
    with pytest.raises(ValueError, match="stream"):
        sample_timesteps(4, 1000, g, "cpu", noisy, stream="query")


def _module(**options):
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim)
    return DiffDisMethod(unet, text, DDPMScheduler(num_train_timesteps=1000), LossConfig(**options)), tok


@pytest.mark.parametrize("fraction, expected", [(1.0, 8), (0.5, 4), (0.01, 2)])
def test_ita_fraction_sets_the_discrimination_batch(fraction, expected):
    module, tok = _module(ita_fraction=fraction)
    seen = []
    original = module.unet.forward_text

    def spy(e_t, *args, **kwargs):
        seen.append(e_t.shape[0])
        return original(e_t, *args, **kwargs)

    module.unet.forward_text = spy
    ids = tok(["a red circle"] * 8, padding="max_length", return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", return_tensors="pt").input_ids
    out = module(torch.randn(8, 3, 8, 8), ids, empty, torch.Generator().manual_seed(0))
    assert seen == [expected]
    assert torch.isfinite(out["loss"]) and "loss_ita" in out


@pytest.mark.parametrize("ig, ita, expected", [(1.0, 1.0, (8, 8)), (0.5, 1.0, (4, 8)), (0.25, 0.5, (2, 4))])
def test_ig_fraction_sets_the_generation_batch(ig, ita, expected):
    module, tok = _module(ig_fraction=ig, ita_fraction=ita)
    seen = {}
    unet_forward, text_forward = module.unet.forward, module.unet.forward_text

    def spy_gen(sample, *args, **kwargs):
        seen["gen"] = sample.shape[0]
        return unet_forward(sample, *args, **kwargs)

    def spy_text(e_t, *args, **kwargs):
        seen["ita"] = e_t.shape[0]
        return text_forward(e_t, *args, **kwargs)

    module.unet.forward, module.unet.forward_text = spy_gen, spy_text
    ids = tok(["a red circle"] * 8, padding="max_length", return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", return_tensors="pt").input_ids
    out = module(torch.randn(8, 3, 8, 8), ids, empty, torch.Generator().manual_seed(0))
    assert (seen["gen"], seen["ita"]) == expected
    assert torch.isfinite(out["loss"]) and "loss_ita" in out


def test_ita_every_skips_the_discrimination_pass_between_its_steps():
    module, tok = _module(ita_every=3)
    calls = []
    original = module.unet.forward_text

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.unet.forward_text = spy
    ids = tok(["a red circle"] * 4, padding="max_length", return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", return_tensors="pt").input_ids
    keys = []
    for step in (0, 1, 2, 3, None):
        out = module(torch.randn(4, 3, 8, 8), ids, empty, torch.Generator().manual_seed(0), step=step)
        keys.append("loss_ita" in out)
        if "loss_ita" not in out:  # generation only: the total is L_IG
            assert torch.equal(out["loss"], out["loss_ig"])
    assert keys == [True, False, False, True, True]
    assert len(calls) == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.ita_fraction=0", "ita_fraction"),
        ("loss.ita_fraction=1.5", "ita_fraction"),
        ("loss.ita_every=0", "ita_every"),
        ("loss.ig_fraction=0", "ig_fraction"),
        ("loss.timestep_sampling=normal", "timestep_sampling"),
        ("loss.timestep_std=0", "timestep_std"),
        ("loss.text_timestep_sampling=max", "text_timestep_sampling"),
        ("loss.text_timestep_std=-1", "text_timestep_std"),
        ("model.unet.addition_embed_type=text model.unet.addition_embed_type_num_heads=48", "must divide"),
        ("model.unet.addition_embed_type=image", "addition_embed_type"),
    ],
)
def test_step_option_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override.split())


@pytest.mark.parametrize("overrides, lrs", [
    (["train.learning_rate_new=null", "train.learning_rate_text_encoder=null"], (1e-3, 1e-3, 1e-3)),
    (["train.learning_rate_new=2e-3", "train.learning_rate_text_encoder=5e-4"], (1e-3, 2e-3, 5e-4)),
])
def test_optimizer_has_a_learning_rate_for_the_unet_the_text_stream_and_the_text_encoder(overrides, lrs):
    from diffdis.train.build import build_optimizer

    module, _ = _module()
    cfg = load_config("tiny", ["train.learning_rate=1e-3"] + overrides)
    groups = build_optimizer(cfg, module).param_groups
    new = {id(p) for p in module.unet.new_parameters()}
    expected = [
        [p for p in module.unet.parameters() if id(p) not in new],
        list(module.unet.new_parameters()),
        list(module.text_encoder.parameters()),
    ]
    assert [g["lr"] for g in groups] == list(lrs)
    for group, params in zip(groups, expected):
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
    # a frozen text encoder is left out of the optimiser
    module.text_encoder.requires_grad_(False)
    assert len(build_optimizer(cfg, module).param_groups) == 2


def test_weight_decay_1d_false_exempts_biases_norms_and_the_logit_scale_and_keeps_each_groups_learning_rate():
    from diffdis.train.build import build_optimizer

    module, _ = _module()
    cfg = load_config("tiny", ["train.learning_rate=1e-3", "train.learning_rate_new=2e-3", "train.learning_rate_text_encoder=5e-4",
                              "train.weight_decay=0.05", "train.weight_decay_1d=false"])
    groups = build_optimizer(cfg, module).param_groups
    by_id = {id(p): g for g in groups for p in g["params"]}
    # every trainable parameter is in exactly one group
    assert len(by_id) == sum(len(g["params"]) for g in groups) == sum(1 for p in module.parameters() if p.requires_grad)
    assert by_id[id(module.unet.logit_scale)]["weight_decay"] == 0.0
    new = {id(p) for p in module.unet.new_parameters()}
    text = {id(p) for p in module.text_encoder.parameters()}
    for name, p in module.named_parameters():
        group = by_id[id(p)]
        assert group["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0), name
        assert group["lr"] == (2e-3 if id(p) in new else 5e-4 if id(p) in text else 1e-3), name
    assert any(p.ndim < 2 for p in module.parameters()) and any(p.ndim >= 2 for p in module.parameters())
    # the default decays everything, as before
    assert {g["weight_decay"] for g in build_optimizer(load_config("tiny", ["train.weight_decay=0.05"]), module).param_groups} == {0.05}
