"""The speed work on the training step leaves its computation unchanged: one DiffDis step on a fixed seed gives the
losses and gradients it gave before (values recorded at 1191deb, the code before that work), and each faster path
equals the plain one it replaces."""

from __future__ import annotations

import copy
from typing import Dict

import pytest
import torch
from diffusers import DDPMScheduler
from helpers_tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet

import diffdis.methods as methods
from diffdis.config import load_config
from diffdis.models import DualStreamUNet
from diffdis.models.fusion import PostMidLayer
from diffdis.train.build import Components, build_optimizer

# loss terms and the summed |gradient| of each part after one step of `_step(fusion, ig_fraction)`, from 1191deb
RECORDED = {
    ("joint", 1.0): {"loss_ig": 0.986375093460083, "loss": 4.193490028381348, "loss_ita": 3.2071146965026855,
                     "acc_i2t": 0.25, "acc_t2i": 0.125, "logit_scale": 14.285714149475098,
                     "grad/unet.unet": 4729.70556640625, "grad/unet.fusion_blocks": 1136.6534423828125,
                     "grad/unet.post_layers": 2604.81396484375, "grad/unet.text_head": 310.6116943359375,
                     "grad/unet.logit_scale": 1.998268485069275, "grad/text_encoder": 1378.12353515625},
    ("joint", 0.5): {"loss_ig": 1.3494528532028198, "loss": 4.447495460510254, "loss_ita": 3.0980424880981445,
                     "acc_i2t": 0.0, "acc_t2i": 0.125, "logit_scale": 14.285714149475098,
                     "grad/unet.unet": 4445.32470703125, "grad/unet.fusion_blocks": 907.8583374023438,
                     "grad/unet.post_layers": 1893.0863037109375, "grad/unet.text_head": 195.49290466308594,
                     "grad/unet.logit_scale": 1.6961078643798828, "grad/text_encoder": 1073.255126953125},
    ("one_way", 1.0): {"loss_ig": 0.986375093460083, "loss": 4.176102638244629, "loss_ita": 3.189727544784546,
                       "acc_i2t": 0.25, "acc_t2i": 0.125, "logit_scale": 14.285714149475098,
                       "grad/unet.unet": 4726.0439453125, "grad/unet.fusion_blocks": 1129.560302734375,
                       "grad/unet.post_layers": 2586.99951171875, "grad/unet.text_head": 308.99383544921875,
                       "grad/unet.logit_scale": 1.971535563468933, "grad/text_encoder": 1376.238525390625},
}
PARTS = ("unet.unet", "unet.fusion_blocks", "unet.post_layers", "unet.text_head", "unet.logit_scale", "text_encoder")


def _method(fusion: str, ig_fraction: float):
    """A tiny DiffDis method, two post-mid layers, every parameter moved off its (zero) initialisation."""
    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, with_projection=True)
    torch.manual_seed(0)
    unet = DualStreamUNet.from_unet(tiny_unet(), text_dim=text.config.projection_dim, fusion=fusion, post_mid_layers=2)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # zero-initialised outputs would hide a wrong text stream
        for p in list(unet.parameters()) + list(text.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    # the record predates the logit-normal default of the query's timesteps: the uniform draw it was made with
    cfg = load_config(None, ["method=diffdis", f"model.fusion={fusion}", f"loss.ig_fraction={ig_fraction}",
                             "loss.text_timestep_sampling=uniform"])
    return methods.build(cfg, Components(tok, text, unet, DDPMScheduler(num_train_timesteps=1000))), tok, cfg


def _batch(method, tok, n: int = 8):
    size, channels = method.unet.config.sample_size, method.unet.config.in_channels
    latents = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))
    ids = tok(["a red circle", "a blue square", "a small green star", "the large yellow triangle"] * (n // 4),
              padding="max_length", max_length=16, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    return latents, ids, empty


def _step(fusion: str, ig_fraction: float) -> Dict[str, float]:
    """Loss terms and summed |gradient| per part of one step."""
    method, tok = _method(fusion, ig_fraction)[:2]
    losses = method(*_batch(method, tok), torch.Generator().manual_seed(1), gather=False)
    losses["loss"].backward()
    out = {k: float(v.detach()) for k, v in losses.items()}
    for part in PARTS:
        module = method.get_submodule(part) if part != "unet.logit_scale" else None
        params = [method.unet.logit_scale] if module is None else list(module.parameters())
        out[f"grad/{part}"] = float(sum(p.grad.abs().sum() for p in params if p.grad is not None))
    return out


@pytest.mark.parametrize("fusion, ig_fraction", list(RECORDED))
def test_a_step_gives_the_losses_and_gradients_recorded_before_the_speed_work(fusion, ig_fraction):
    assert _step(fusion, ig_fraction) == pytest.approx(RECORDED[fusion, ig_fraction], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("one_way", [False, True])
def test_the_last_post_mid_layer_computes_the_text_token_alone_as_the_whole_layer_does(one_way):
    torch.manual_seed(0)
    layer = PostMidLayer(16, 4)
    img = torch.randn(3, 5, 16, requires_grad=True)  # (B, N, C)
    txt = torch.randn(3, 1, 16, requires_grad=True)  # (B, 1, C)
    _, whole, (k, v) = layer(img, txt, one_way)
    alone, (k2, v2) = layer.forward_text(img, txt)
    torch.testing.assert_close(alone, whole)
    torch.testing.assert_close((k2, v2), (k, v))
    grads = torch.autograd.grad(whole.square().sum(), [img, txt, *layer.parameters()])
    grads_alone = torch.autograd.grad(alone.square().sum(), [img, txt, *layer.parameters()])
    torch.testing.assert_close(grads_alone, grads)


def test_the_fused_adamw_update_equals_the_default_one():
    method, tok, cfg = _method("joint", 1.0)
    method(*_batch(method, tok), torch.Generator().manual_seed(0), gather=False)["loss"].backward()
    grads = {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}
    updated = {}
    for fused in (False, True):
        copy_ = copy.deepcopy(method)
        cfg.train.adam_fused = fused
        optimizer = build_optimizer(cfg, copy_)
        assert bool(optimizer.defaults["fused"]) == fused
        for step in range(3):  # the same gradients each step; later steps read the moments of the first
            for name, p in copy_.named_parameters():
                p.grad = grads[name] * (step + 1) if name in grads else None
            optimizer.step()
        updated[fused] = {name: p.detach() for name, p in copy_.named_parameters()}
    torch.testing.assert_close(updated[True], updated[False], rtol=1e-5, atol=1e-6)


def test_adamw_is_fused_by_default_where_torch_has_the_kernel():
    method, _, cfg = _method("joint", 1.0)
    assert build_optimizer(cfg, method).defaults["fused"] is True  # CPU
    assert not build_optimizer(cfg, method, torch.device("meta")).defaults["fused"]


if __name__ == "__main__":  # prints RECORDED for the code on the path
    for key in RECORDED:
        print(f"    {key!r}: {_step(*key)!r},")
