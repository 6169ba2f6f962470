"""Shared test set-up: offline hub, deterministic CPU, the repo on sys.path."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

TINY_TRAIN_OVERRIDES = [
    "model.unet.block_out_channels=[16,32]",
    "model.unet.norm_num_groups=8",
    "model.unet.attention_head_dim=2",
    "model.text_encoder.hidden_size=32",
    "model.text_encoder.num_hidden_layers=1",
    "model.text_encoder.num_attention_heads=2",
    "model.text_encoder.intermediate_size=64",
    "model.text_encoder.projection_dim=16",
    "model.post_mid_layers=1",
    "data.num_train_samples=48",
    "train.batch_size=4",
    "train.validation_batches=1",
    "train.validation_every=2",
    "train.log_every=1",
    "train.lr_warmup_steps=1",
    "train.report_to=tensorboard",
]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread for every test: tiny models gain nothing from intra-op threads, and on a busy
    2-core machine the thread pool spins (5-10x slower)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_overrides():
    """Overrides that make tools/train.py train a very small model on a few embedded images."""
    return list(TINY_TRAIN_OVERRIDES)
