"""What the training benchmark can switch on for every arm alike, and model FLOP utilisation.

Attention kernels (PyTorch SDPA or xFormers), ``channels_last`` and regional ``torch.compile`` (each down, mid and up
block of a UNet compiled on its own, as diffusers recommends for UNets) are applied to every arm's generation UNet, so
a ratio compares the same settings. FLOPs are counted with torch's ``FlopCounterMode`` on one step of each arm in eager
mode with SDPA (it has formulas for SDPA's kernels, not xFormers'); MFU is achieved FLOP/s over the device's peak.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# dense tensor-core peak TFLOP/s in bf16 / fp16 (the vendors' data sheets, without sparsity), by a substring of
# torch.cuda.get_device_name(); the first match wins
PEAK_TFLOPS_16BIT = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2),
)


def peak_tflops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """The device's dense bf16/fp16 peak in TFLOP/s from :data:`PEAK_TFLOPS_16BIT`, or None (a CPU, float32, or a GPU
    not in the table: give ``--peak-tflops``)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS_16BIT if key in name), None)


def set_attention(unet: nn.Module, kind: str) -> None:
    """``sdpa`` (PyTorch's scaled-dot-product attention, diffusers' default) or ``xformers`` on ``unet``."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if kind == "xformers":
        if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
            raise ValueError("--attention xformers needs CUDA and the xformers package")
        unet.enable_xformers_memory_efficient_attention()
    elif kind == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    else:
        raise ValueError(f"unknown attention '{kind}': sdpa or xformers")


def to_channels_last(module: nn.Module) -> None:
    """Every 4-d parameter and buffer of ``module`` in ``channels_last`` memory format, in place."""
    nn.Module.to(module, memory_format=torch.channels_last)


def unet_blocks(unet: nn.Module) -> Iterable[nn.Module]:
    """The down, mid and up blocks of a diffusers UNet: the repeated regions that regional compilation compiles."""
    yield from unet.down_blocks
    if unet.mid_block is not None:
        yield unet.mid_block
    yield from unet.up_blocks


def check_backend(name: str) -> None:
    """A ValueError naming ``name`` unless torch.compile knows that backend."""
    from torch._dynamo import list_backends, lookup_backend

    try:
        lookup_backend(name)
    except Exception as err:  # torch._dynamo.exc.InvalidBackend
        raise ValueError(f"unknown torch.compile backend '{name}' (e.g. {', '.join(list_backends())})") from err


def compile_blocks(unet: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` each block of ``unet`` in place (``nn.Module.compile``); returns how many."""
    blocks = list(unet_blocks(unet))
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def count_flops(step: Callable[[], object], unet: Optional[nn.Module] = None) -> int:
    """FLOPs of one call of ``step`` (forward and backward; the optimiser is not counted), with ``unet``'s attention
    (when given) switched to SDPA for the count and switched back after."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = unet.attn_processors if unet is not None else None
    if unet is not None:
        unet.set_attn_processor(AttnProcessor2_0())
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
    finally:
        if unet is not None:
            unet.set_attn_processor(processors)
    return counter.get_total_flops()


def utilisation(flops: Dict[str, int], seconds: Dict[str, float], peak: Optional[float]) -> Dict[str, object]:
    """For each arm: TFLOP per step, achieved TFLOP/s and, with a ``peak`` (TFLOP/s), MFU (achieved / peak)."""
    out: Dict[str, object] = {"peak_tflops": peak}
    for name, count in flops.items():
        achieved = count / seconds[name] / 1e12
        out.update({f"{name}_tflop_per_step": count / 1e12, f"{name}_tflops": achieved,
                    f"{name}_mfu": achieved / peak if peak else None})
    return out
