"""Soft Dice loss (the seed's definition), optionally with binary cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = 1e-5,
    weight: torch.Tensor | None = None,
    from_logits: bool = True,
) -> torch.Tensor:
    """Soft Dice loss per region channel, averaged over channels.

    ``loss_c = 1 - (2 * sum(P * G) + eps) / (sum(P^2) + sum(G^2) + eps)`` with P the sigmoid
    probabilities and G the binary target of channel c, summed over the batch and all spatial
    voxels (one Dice per channel for the whole batch, so a patch without tumour does not give
    a degenerate 0/0 Dice).

    Parameters
    ----------
    logits : torch.Tensor
        (B, C, *S) logits, or probabilities when ``from_logits=False``.
    target : torch.Tensor
        (B, C, *S) binary (0/1) targets, one channel per region (WT, TC, ET).
    eps : float
        Smoothing term of numerator and denominator.
    weight : torch.Tensor, optional
        Voxel weights broadcastable to (B, C, *S); they multiply every sum (0 = ignored voxel).
    from_logits : bool
        Apply the sigmoid first.

    Returns
    -------
    torch.Tensor
        Scalar loss in [0, 1].
    """
    p = torch.sigmoid(logits.float()) if from_logits else logits.float()
    g = target.float()
    dims = [0, *range(2, p.ndim)]
    if weight is not None:
        w = weight.float().expand_as(p)
        intersection = (w * p * g).sum(dims)
        denominator = (w * p * p).sum(dims) + (w * g * g).sum(dims)
    else:
        intersection = (p * g).sum(dims)
        denominator = (p * p).sum(dims) + (g * g).sum(dims)
    dice = (2 * intersection + eps) / (denominator + eps)
    return 1 - dice.mean()


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    bce_weight: float = 1.0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """`soft_dice_loss` plus ``bce_weight`` x binary cross-entropy (mean over weighted voxels).

    Shapes as in `soft_dice_loss`.
    """
    dice = soft_dice_loss(logits, target, eps=eps, weight=weight)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if weight is not None:
        w = weight.float().expand_as(bce)
        bce = (bce * w).sum() / w.sum().clamp_min(1e-6)
    else:
        bce = bce.mean()
    return dice + bce_weight * bce
