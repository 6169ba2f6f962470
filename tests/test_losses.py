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
