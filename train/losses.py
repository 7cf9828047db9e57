"""Training losses, pure functions: focal + dice for decoder maps, answer-token cross-entropy for the assistant."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anomalygpt.assistant import IGNORE_INDEX


def focal_loss(logits: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss of two-class logits (B, 2, H, W) against a binary mask (B, H, W)."""
    log_p = F.log_softmax(logits, dim=1)
    target = mask.long()
    log_pt = log_p.gather(1, target[:, None])[:, 0]  # (B, H, W) log-probability of the true class
    return (-((1.0 - log_pt.exp()) ** gamma) * log_pt).mean()


def dice_loss(probability: torch.Tensor, mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of the abnormal probability (B, H, W) with the mask, over the whole batch."""
    target = mask.float()
    overlap = (probability * target).sum()
    return 1.0 - (2.0 * overlap + eps) / (probability.sum() + target.sum() + eps)


def segmentation_loss(
    logits: Sequence[torch.Tensor], mask: torch.Tensor, dice_weight: float = 1.0, gamma: float = 2.0
) -> torch.Tensor:
    """Focal + dice, summed over stages; each stage's logits (B, 2, h, w) are upsampled to the mask (B, H, W)."""
    total = mask.new_zeros((), dtype=torch.float32)
    for stage_logits in logits:
        up = F.interpolate(stage_logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        total = total + focal_loss(up, mask, gamma) + dice_weight * dice_loss(up.softmax(dim=1)[:, 1], mask)
    return total


def answer_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K,) sequence positions whose next token is labelled in some row of labels (B, L): the only logits the
    loss needs."""
    return torch.nonzero((labels[:, 1:] != ignore_index).any(dim=0))[:, 0]


def answer_loss(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of labels (B, L) only (all but the answers are
    ignore_index). Logits (B, L, V) cover every position, or (B, K, V) the given positions; position t predicts
    token t + 1.
    """
    if positions is None:
        positions = torch.arange(labels.shape[1] - 1, device=labels.device)
        logits = logits[:, :-1]
    targets = labels[:, positions + 1]  # (B, K)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
