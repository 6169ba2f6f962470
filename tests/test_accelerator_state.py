"""Commands run one after another in one process (the demo, in-process tests) each get their own accelerate state.

accelerate keeps one state per process, and an ``Accelerator`` that asks for another device or mixed
precision than an earlier one raises "AcceleratorState has already been initialized". On a CUDA machine
that is ``Accelerator(cpu=True)`` (``--device cpu``) after a training run on the GPU. This machine has no
GPU, so the earlier CUDA run is stood in for by ``ACCELERATE_TORCH_DEVICE=meta``: a state whose device
type is not "cpu", which is the condition accelerate checks.
"""

import socket

import pytest
import torch
from accelerate import Accelerator

from diffdis.utils.distributed import new_accelerator, release_accelerator_state


@pytest.fixture
def fresh_state():
    release_accelerator_state()
    yield
    release_accelerator_state()


def _state_of_a_cuda_run(monkeypatch) -> None:
    release_accelerator_state()
    monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "meta")
    assert Accelerator().device.type == "meta"
    monkeypatch.delenv("ACCELERATE_TORCH_DEVICE")


def test_accelerate_refuses_a_cpu_accelerator_after_a_gpu_one(fresh_state, monkeypatch):
    _state_of_a_cuda_run(monkeypatch)
    with pytest.raises(ValueError, match="already been initialized.*cpu=True"):
        Accelerator(cpu=True)


def test_new_accelerator_takes_its_own_device_and_precision(fresh_state, monkeypatch):
    _state_of_a_cuda_run(monkeypatch)
    assert new_accelerator(cpu=True).device.type == "cpu"
    with pytest.raises(ValueError, match="mixed_precision='bf16'"):
        Accelerator(cpu=True, mixed_precision="bf16")
    assert new_accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"


def test_the_state_of_a_process_group_is_kept(fresh_state):
    """Under a launched multi-process run the state holds the ranks: it is not released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        accelerator = Accelerator(cpu=True)
        assert release_accelerator_state() is False
        assert accelerator.num_processes == 1 and accelerator.device.type == "cpu"
    finally:
        torch.distributed.destroy_process_group()


def test_commands_in_one_process_after_other_accelerators(tmp_path, fresh_state, monkeypatch, tiny_overrides):
    from diffdis.cli import train, zeroshot

    Accelerator(cpu=True, mixed_precision="bf16")  # an earlier run with train.mixed_precision=bf16
    overrides = tiny_overrides + [f"train.output_dir={tmp_path}", "train.max_steps=1", "train.report_to=none",
                                  "train.validation_every=0"]
    assert train.main(overrides) == 0
    _state_of_a_cuda_run(monkeypatch)
    argv = [str(tmp_path / "model"), "--task", "shape", "--num-samples", "4", "--steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "zs")]
    assert zeroshot.main(argv) == 0
    assert (tmp_path / "zs" / "results.json").is_file()
