"""Loss terms (SPEC §3.1): Dice and BCE per (sample, query) averaged over the valid queries, and next-token
cross-entropy, from logits or straight from the last hidden states without full-vocabulary logits."""

from __future__ import annotations

import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

try:  # optional Triton kernels for CUDA (docs/performance.md); not in requirements.txt
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
except ImportError:
    LigerFusedLinearCrossEntropyLoss = None

# Labelled positions projected onto the vocabulary at once by the pure-torch path: at 7B a chunk's fp32 logits are
# 1024 × 151,666 × 4 B ≈ 0.6 GB, and only one chunk's logits exist at a time (recomputed in backward).
CE_CHUNK_TOKENS = 1024

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


def linear_cross_entropy(hidden: Tensor, head: nn.Module, labels: Tensor, chunk: int = CE_CHUNK_TOKENS) -> Tensor:
    """`shifted_cross_entropy(head(hidden), labels)` without the (B, L, V) logits: hidden (B, L, D), labels (B, L).

    Only positions whose next token has a label are projected (a training sample labels its assistant replies, a
    small part of its image and prompt tokens). On CUDA with liger-kernel installed its fused linear cross-entropy
    does the projection and the loss chunk by chunk in Triton; otherwise `chunk` positions at a time go through
    `head` under activation checkpointing, so backward recomputes each chunk's logits instead of keeping them.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    if not keep.any():  # still through `head`, so its trained rows get a (zero) gradient, as DDP needs
        return head(hidden[:, :1]).float().sum() * 0.0
    h, t = hidden[:, :-1][keep], targets[keep]  # (T, D), (T,)
    if LigerFusedLinearCrossEntropyLoss is not None and h.is_cuda:
        return LigerFusedLinearCrossEntropyLoss(reduction="mean")(_effective_weight(head), h, t).float()
    total = sum(checkpoint(_cross_entropy_sum, head, h[i:i + chunk], t[i:i + chunk], use_reentrant=False)
                for i in range(0, t.numel(), chunk))
    return total / t.numel()


def _cross_entropy_sum(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _effective_weight(head: nn.Module) -> Tensor:
    """The (V, D) matrix `head` multiplies by, differentiable in what is trained of it: a head with trainable rows
    (model/trainable_rows.py) has them written into a copy of its frozen weight."""
    rows = getattr(head, "trainable_rows", None)
    if rows is None:
        return head.weight
    return head.weight.index_copy(0, head.row_ids, rows.to(head.weight.dtype))
