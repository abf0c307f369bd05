"""Segmentation loss terms per (sample, query), averaged over valid queries (SPEC §3.1)."""

from __future__ import annotations

import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

# Soft Dice with squared denominator: 1 − (2·Σpg + ε) / (Σp² + Σg² + ε), one value per (sample, query).
_dice = DiceLoss(sigmoid=True, squared_pred=True, reduction="none")


def masked_seg_losses(logits: Tensor, targets: Tensor, query_mask: Tensor) -> tuple[Tensor, Tensor]:
    """logits, targets (B, N, H, W); query_mask (B, N) bool → (dice, bce) scalars over the valid queries.

    With no valid query both terms are 0 and still depend on `logits`, so every parameter gets a gradient.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    valid = query_mask.bool()
    if not valid.any():
        zero = logits.sum() * 0.0
        return zero, zero
    # Padded queries carry a −∞-like fill; score only the valid ones.
    logits, targets = logits[valid][None], targets[valid][None]  # (1, V, H, W): one channel per query
    dice = _dice(logits, targets).flatten()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(-2, -1)).flatten()
    return dice.mean(), bce.mean()


def shifted_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token CE: logits (B, L, V) predict labels (B, L) shifted by one; −100 is ignored."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    if not (labels != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
