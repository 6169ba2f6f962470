"""Loss and schedule functions against hand-computed values."""

import math

import torch
import torch.nn.functional as F

from diffdis.losses import contrastive_loss, image_generation_loss, min_snr_weights, total_loss
from diffdis.schedule import snr, text_eps_from_x0, text_forward, text_x0_from_eps


def test_image_loss_plain_and_min_snr():
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 0.0]]]])
    ac = torch.tensor([0.5, 0.9, 0.2])  # snr = 1, 9, 0.25
    t = torch.tensor([1, 2])
    assert math.isclose(image_generation_loss(pred, target, t, ac).item(), (1.0 + 2.0) / 2)
    # Min-SNR-5, epsilon: w = min(snr, 5) / snr -> 5/9 and 1
    got = image_generation_loss(pred, target, t, ac, "epsilon", 5.0).item()
    assert math.isclose(got, (1.0 * 5 / 9 + 2.0 * 1.0) / 2, rel_tol=1e-6)
    # v-prediction: w = min(snr, 5) / (snr + 1) -> 0.5, 0.2
    w = min_snr_weights(ac, t, 5.0, "v_prediction")
    assert torch.allclose(w, torch.tensor([5 / 10, 0.25 / 1.25]))


def test_contrastive_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    scale = torch.tensor(2.0)
    out = contrastive_loss(img, txt, scale)
    t = F.normalize(txt, dim=-1)
    logits = 2.0 * img @ t.t()
    labels = torch.arange(2)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert torch.allclose(out["loss"], expected)
    # row 0: sims (1, .707) -> correct; row 1: (0, .707) -> correct
    assert out["acc_i2t"].item() == 1.0
    # perfectly aligned features with a large scale give a near-zero loss
    eye = torch.eye(4)
    assert contrastive_loss(eye, eye, torch.tensor(100.0))["loss"].item() < 1e-6


def test_total_loss():
    out = total_loss(torch.tensor(1.0), torch.tensor(3.0), 0.5)
    assert out["loss"].item() == 2.5 and out["loss_ita"].item() == 3.0
    assert total_loss(torch.tensor(1.0), torch.tensor(3.0), 0.0)["loss"].item() == 1.0


def test_text_forward_and_inverses():
    ac = torch.tensor([0.25, 0.64])
    e0 = torch.tensor([[1.0, 0.0]])
    eps = torch.tensor([[0.0, 2.0]])
    t = torch.tensor([1])
    e_t = text_forward(e0, eps, t, ac, gamma=0.5)
    assert torch.allclose(e_t, torch.tensor([[0.5 * 0.8, 0.6 * 2.0]]))
    assert torch.allclose(text_x0_from_eps(e_t, eps, t, ac, 0.5), e0)
    assert torch.allclose(text_eps_from_x0(e_t, e0, t, ac, 0.5), eps)
    assert torch.allclose(snr(ac, torch.tensor([0, 1])), torch.tensor([0.25 / 0.75, 0.64 / 0.36]))


def _gathered_loss_worker(rank: int, world: int, port: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from diffdis.losses import gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt = _contrastive_batch()
    n = img.shape[0] // world
    local_img = img[rank * n:(rank + 1) * n].clone().requires_grad_()
    local_txt = txt[rank * n:(rank + 1) * n].clone().requires_grad_()
    out = contrastive_loss(local_img, local_txt, torch.tensor(7.0), gather=gather_with_grad)
    out["loss"].backward()
    torch.save({"loss": out["loss"].detach(), "img": local_img.grad, "txt": local_txt.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _contrastive_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)


def test_gathered_contrastive_loss_gives_each_process_the_full_batch_gradient(tmp_path):
    """Two processes, four pairs each: every process's loss is the 8-pair loss, and its features get exactly the
    gradient one process computing all 8 pairs would give them (a local-rows-only loss lacks terms and, in
    data-parallel training, collapsed the features to chance: L_ITA stuck at ln(64))."""
    import torch.multiprocessing as mp
    from helpers_tiny import free_port

    mp.spawn(_gathered_loss_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    img, txt = _contrastive_batch()
    img.requires_grad_(), txt.requires_grad_()
    ref = contrastive_loss(img, txt, torch.tensor(7.0))
    ref["loss"].backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], ref["loss"].detach(), atol=1e-6)
        assert torch.allclose(got["img"], img.grad[rank * 4:(rank + 1) * 4], atol=1e-6)
        assert torch.allclose(got["txt"], txt.grad[rank * 4:(rank + 1) * 4], atol=1e-6)


def test_scale_gradient_keeps_the_value():
    from diffdis.losses import scale_gradient

    x = torch.tensor(3.0, requires_grad=True)
    y = scale_gradient(x * x, 2.0)
    y.backward()
    assert y.item() == 9.0 and x.grad.item() == 12.0  # 2 x d(x^2)/dx
