"""Focal and dice losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import dice_loss, focal_loss, segmentation_loss

# Two pixels with logits (0, ln 3): p(abnormal) = 0.75 each; the first is abnormal, the second normal.
LOGITS = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), math.log(3.0)]]]])  # (1, 2, 1, 2)
MASK = torch.tensor([[[1, 0]]])  # (1, 1, 2)


def test_focal_loss_by_hand():
    abnormal = -(0.25**2) * math.log(0.75)  # true class p = 0.75
    normal = -(0.75**2) * math.log(0.25)  # true class p = 0.25
    assert focal_loss(LOGITS, MASK).item() == pytest.approx((abnormal + normal) / 2, rel=1e-5)


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    expected = torch.nn.functional.cross_entropy(LOGITS, MASK.long())
    assert focal_loss(LOGITS, MASK, gamma=0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dice_loss_by_hand():
    probability = torch.tensor([[[0.75, 0.25]]])
    # overlap 0.75, sums 1.0 + 1 -> 1 - (1.5 + 1) / (2 + 1)
    assert dice_loss(probability, MASK).item() == pytest.approx(1 - 2.5 / 3.0, rel=1e-6)
    assert dice_loss(MASK.float(), MASK, eps=0.0).item() == pytest.approx(0.0, abs=1e-7)


def test_segmentation_loss_sums_stages_at_mask_resolution():
    one_stage = focal_loss(LOGITS, MASK) + dice_loss(LOGITS.softmax(dim=1)[:, 1], MASK)
    assert segmentation_loss([LOGITS, LOGITS], MASK).item() == pytest.approx(2 * one_stage.item(), rel=1e-6)
    coarse = torch.zeros(1, 2, 1, 1, requires_grad=True)  # upsampled to (1, 2)
    loss = segmentation_loss([coarse], MASK)
    loss.backward()
    assert coarse.grad is not None and coarse.grad.abs().sum() > 0
