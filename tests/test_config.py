"""Config schema: YAML + key=value overrides; unknown keys and wrong types are errors naming the key."""

import pytest

from diffdis.config import ConfigError, list_configs, load_config, save_config


def test_default_is_tiny_and_overrides_apply():
    cfg = load_config(None, ["train.max_steps=7", "model.fusion=one_way", "loss.lambda_ita=0.5"])
    assert cfg.data.name == "embedded"
    assert cfg.train.max_steps == 7
    assert cfg.model.fusion == "one_way"
    assert cfg.loss.lambda_ita == 0.5
    assert {"tiny", "sd15"} <= set(list_configs())


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_stepz=3", "max_stepz"),
        ("model.unet.foo=1", "foo"),
        ("train.max_steps=abc", "max_steps"),
        ("model.fusion=sideways", "model.fusion"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_not_key_value_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config", [])


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        load_config(str(bad))


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["train.seed=3"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    """YAML reads a bare `no` as false; `train.mixed_precision=no` (command line or file) must still mean "no"."""
    assert load_config("sd15", ["data.name=embedded", "train.mixed_precision=no"]).train.mixed_precision == "no"
    file = tmp_path / "fp32.yaml"
    file.write_text("data:\n  name: embedded\ntrain:\n  mixed_precision: no\n")
    assert load_config(str(file)).train.mixed_precision == "no"
    assert load_config("sd15", ["data.name=embedded"]).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"])


def test_zero_shot_guidance_without_image_dropout_is_refused():
    with pytest.raises(ConfigError, match="zeroshot.guidance"):
        load_config(None, ["loss.p_uncond=0", "zeroshot.guidance=1"])
    assert load_config(None, ["loss.p_uncond=0", "zeroshot.guidance=0"]).loss.p_uncond == 0
    assert load_config(None, ["loss.p_uncond=0.1", "zeroshot.guidance=1"]).zeroshot.guidance == 1
