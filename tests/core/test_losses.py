"""Soft Dice loss: the seed's worked example and agreement with MONAI."""

import pytest
import torch

from napari_tumorseg.core.losses import dice_bce_loss, soft_dice_loss

P = [0.1, 0.9, 0.2, 0.8, 0.1, 0.0, 0.9, 0.1, 0.0]
G = [0, 1, 0, 0, 0, 0, 1, 0, 1]


def test_seed_worked_example():
    p = torch.tensor(P).reshape(1, 1, 3, 3)
    g = torch.tensor(G, dtype=torch.float32).reshape(1, 1, 3, 3)
    loss = soft_dice_loss(p, g, eps=0.0, from_logits=False)
    # 2 * sum(P*G) = 2 * 1.8 = 3.6; sum(P^2) + sum(G^2) = 2.33 + 3 = 5.33
    assert loss.item() == pytest.approx(1 - 3.6 / 5.33, abs=1e-6)
    assert loss.item() == pytest.approx(0.325, abs=1e-3)


@pytest.mark.parametrize("spatial", [(8, 8), (6, 7, 5)])
def test_agrees_with_monai_squared_dice(spatial):
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, *spatial, generator=g)
    target = (torch.rand(2, 3, *spatial, generator=g) > 0.6).float()
    monai = DiceLoss(sigmoid=True, squared_pred=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    assert soft_dice_loss(logits, target).item() == pytest.approx(
        monai(logits, target).item(), abs=1e-6
    )


def test_weights_ignore_voxels_and_gradients_flow():
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    weight = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    full = soft_dice_loss(logits, target, eps=0.0)
    masked = soft_dice_loss(logits, target, eps=0.0, weight=weight)
    # p = 0.5 everywhere; only the first (positive) voxel counts in the masked loss.
    assert masked.item() == pytest.approx(1 - (2 * 0.5) / (0.25 + 1))
    assert full.item() == pytest.approx(1 - (2 * 1.0) / (1.0 + 2.0))
    dice_bce_loss(logits, target, weight=weight).backward()
    assert logits.grad is not None and logits.grad[0, 0, 1] == 0
