"""The example accelerate configs in configs/accelerate/ load with accelerate's own loader and launch parser,
and say what their names promise (processes = machines x GPUs, distributed type, bf16)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils import constants as accelerate_constants

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs" / "accelerate"

# file -> (distributed type, machines, GPUs per machine)
EXPECTED = {
    "single_gpu.yaml": (DistributedType.NO, 1, 1),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 1, 8),
    "two_nodes.yaml": (DistributedType.MULTI_GPU, 2, 8),
    "fsdp.yaml": (DistributedType.FSDP, 1, 8),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 1, 8),
}
# fsdp_config keys whose values accelerate checks against a fixed list (at launch, on a machine with GPUs)
FSDP_CHOICES = {
    "fsdp_sharding_strategy": accelerate_constants.FSDP_SHARDING_STRATEGY,
    "fsdp_auto_wrap_policy": accelerate_constants.FSDP_AUTO_WRAP_POLICY,
    "fsdp_backward_prefetch": accelerate_constants.FSDP_BACKWARD_PREFETCH,
    "fsdp_state_dict_type": accelerate_constants.FSDP_STATE_DICT_TYPE,
}


def _launch_options() -> set[str]:
    """Every option ``accelerate launch`` knows, by its attribute name."""
    return {action.dest for action in launch_command_parser()._actions}


def unknown_nested_keys(config: ClusterConfig) -> list[str]:
    """Keys of ``fsdp_config`` / ``deepspeed_config`` that ``accelerate launch`` does not know.

    accelerate's loader rejects unknown top-level keys but copies these nested ones onto the launch arguments
    unchecked (``fsdp_config.x`` becomes ``fsdp_x``), so a typo there would be silently ignored.
    """
    options = _launch_options()
    names = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.fsdp_config]
    names += list(config.deepspeed_config)
    return [name for name in names if name not in options]


def _tiny_diffdis_module():
    """A tiny DiffDisMethod (dual-stream UNet + CLIP text encoder), the object the trainer hands to FSDP."""
    from diffusers import DDPMScheduler
    from helpers_tiny import CONTEXT_DIM, tiny_text_encoder, tiny_tokenizer, tiny_unet

    from diffdis.config import LossConfig
    from diffdis.models.dual_stream_unet import DualStreamUNet
    from diffdis.methods import DiffDisMethod

    unet = DualStreamUNet.from_unet(tiny_unet(sample_size=8), text_dim=CONTEXT_DIM)
    text_encoder = tiny_text_encoder(tiny_tokenizer(), with_projection=True)
    return DiffDisMethod(unet, text_encoder, DDPMScheduler(num_train_timesteps=10), LossConfig())


def test_every_config_file_is_checked():
    assert sorted(p.name for p in CONFIG_DIR.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_is_consistent(name):
    path = CONFIG_DIR / name
    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` calls
    assert isinstance(config, ClusterConfig)
    distributed_type, machines, gpus_per_machine = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_machines == machines
    assert config.num_processes == machines * gpus_per_machine
    assert config.machine_rank == 0 and config.mixed_precision == "bf16" and config.use_cpu is False
    assert unknown_nested_keys(config) == []
    assert f"accelerate launch --config_file configs/accelerate/{name}" in path.read_text()  # the header says how to use it


def test_two_nodes_config_reaches_the_main_node():
    config = load_config_from_file(str(CONFIG_DIR / "two_nodes.yaml"))
    assert config.main_process_ip and isinstance(config.main_process_port, int)
    assert "machine_rank 1" in (CONFIG_DIR / "two_nodes.yaml").read_text()  # the note for the second node


def test_fsdp_config_values_and_wrapped_classes():
    config = load_config_from_file(str(CONFIG_DIR / "fsdp.yaml")).fsdp_config
    for key, choices in FSDP_CHOICES.items():
        assert config[key] in choices, key
    assert config["fsdp_sharding_strategy"] == "FULL_SHARD" and config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert config["fsdp_use_orig_params"] is True  # the root unit mixes the frozen text encoder and trained parameters
    # accelerate raises at prepare() when a class to wrap is missing from the model: check them on the real module
    from accelerate.utils.dataclasses import get_module_class_from_name

    module = _tiny_diffdis_module()
    for cls_name in config["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert get_module_class_from_name(module, cls_name) is not None, cls_name


def test_deepspeed_config_is_zero2_and_leaves_accumulation_to_the_trainer():
    from accelerate.utils import DeepSpeedPlugin, patch_environment

    config = load_config_from_file(str(CONFIG_DIR / "deepspeed_zero2.yaml")).deepspeed_config
    assert config["zero_stage"] == 2 and "gradient_accumulation_steps" not in config
    # the plugin accelerate builds from the launcher's environment (deepspeed itself is not needed for this)
    with patch_environment(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(config["zero_stage"]),
                           ACCELERATE_GRADIENT_CLIPPING=str(config["gradient_clipping"])):
        plugin = DeepSpeedPlugin()
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # filled from the trainer's Accelerator


@pytest.mark.parametrize(
    "name, edit",
    [
        ("ddp_8gpu.yaml", lambda c: c.update(num_machine=c.pop("num_machines"))),  # top-level typo
        ("ddp_8gpu.yaml", lambda c: c.update(distributed_type="MULTI_GPUS")),  # bad value
        ("fsdp.yaml", lambda c: c["fsdp_config"].update(fsdp_sharding_stategy=c["fsdp_config"].pop("fsdp_sharding_strategy"))),
        ("deepspeed_zero2.yaml", lambda c: c["deepspeed_config"].update(zero_stag=c["deepspeed_config"].pop("zero_stage"))),
    ],
)
def test_a_typo_fails_the_checks(tmp_path, name, edit):
    data = yaml.safe_load((CONFIG_DIR / name).read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    try:
        config = load_config_from_file(str(path))
    except ValueError:
        return  # accelerate's loader rejects unknown top-level keys and unknown enum values
    assert unknown_nested_keys(config), "a typo'd nested key went unnoticed"


def test_the_shipped_files_survive_a_copy(tmp_path):
    """The checks above are not tied to the folder: a verbatim copy passes them too (the typo test is fair)."""
    for name in EXPECTED:
        shutil.copy(CONFIG_DIR / name, tmp_path / name)
        assert unknown_nested_keys(load_config_from_file(str(tmp_path / name))) == []
