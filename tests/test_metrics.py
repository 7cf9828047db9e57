"""Metrics against hand-computed values; the streaming pixel metrics against the direct ones."""

from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import (
    MAX_FPR,
    PixelMetrics,
    area_up_to,
    aupro,
    float16_keys,
    image_metrics,
    pixel_metrics,
    pro_curve,
    region_weights,
    verdict_metrics,
)


def toy_pair() -> tuple[np.ndarray, np.ndarray]:
    """4x4 map and mask with two 2-pixel components, A top-left and B right edge (8-connected apart)."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[0, 1] = True  # component A
    mask[2, 3] = mask[3, 3] = True  # component B
    score = np.full((4, 4), 0.1)
    score[0, 0], score[0, 1] = 0.9, 0.5  # A
    score[2, 3], score[3, 3] = 0.8, 0.2  # B
    score[1, 1], score[2, 1] = 0.7, 0.3  # two good pixels above the 0.1 floor; 10 good pixels at 0.1
    return score, mask


def blob_masks(rng: np.random.Generator, count: int, shape: tuple[int, int]) -> list[np.ndarray]:
    """Masks with one or two random rectangles each."""
    masks = []
    for _ in range(count):
        mask = np.zeros(shape, dtype=bool)
        for _ in range(rng.integers(1, 3)):
            top, left = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
            mask[top : top + rng.integers(2, 5), left : left + rng.integers(2, 6)] = True
        masks.append(mask)
    return masks


def test_image_metrics_by_hand() -> None:
    # scores 0.1(0) 0.4(0) 0.35(1) 0.8(1); AUROC: of 4 (pos, neg) pairs, 0.35<0.4 is the one wrong -> 3/4.
    # AP, descending 0.8(1) 0.4(0) 0.35(1): recall steps 0.5 at precision 1, 0.5 at precision 2/3 -> 5/6.
    # F1: t=0.8 P=1 R=.5 -> 2/3; t=0.35 P=2/3 R=1 -> 0.8; t=0.1 P=.5 R=1 -> 2/3 -> max 0.8.
    result = image_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert result == pytest.approx({"auroc": 0.75, "aupr": 5 / 6, "f1_max": 0.8})


def test_image_metrics_rejects_one_class_and_length_mismatch() -> None:
    with pytest.raises(ValueError, match="both good"):
        image_metrics(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"labels \(3\) and scores \(2\) differ"):
        image_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        image_metrics(np.array([0, 1]), np.array([0.1, np.nan]))


def test_verdict_metrics_by_hand_and_empty_groups() -> None:
    # labels 0 0 0 1 1, verdicts 1 0 0 1 0: right on 3/5; 1 of 3 good flagged; 1 of 2 defects flagged.
    result = verdict_metrics(np.array([0, 0, 0, 1, 1]), np.array([1, 0, 0, 1, 0]))
    assert result == pytest.approx({"accuracy": 0.6, "false_alarm_rate": 1 / 3, "recall": 0.5})
    only_good = verdict_metrics(np.array([0, 0, 0, 0]), np.array([False, True, False, False]))
    assert only_good == {"accuracy": 0.75, "false_alarm_rate": 0.25, "recall": None}
    with pytest.raises(ValueError, match="non-zero lengths"):
        verdict_metrics(np.array([0, 1]), np.array([1]))


def test_pixel_metrics_on_toy_by_hand() -> None:
    # Thresholds high to low -> (FPR, PRO): 0.9 (0, 1/4); 0.8 (0, 1/2); 0.7 (1/12, 1/2); 0.5 (1/12, 3/4);
    # 0.3 (2/12, 3/4); 0.2 (2/12, 1); 0.1 (1, 1). Area on [0, 0.3]: 1/12*1/2 + 1/12*3/4 + (0.3-2/12)*1
    # = 10/240 + 15/240 + 32/240 = 57/240; / 0.3 -> 19/24.
    # Pixel AUROC: pairs won by 0.9, 0.8, 0.5, 0.2 over the 12 good pixels: 12+12+11+10 = 45 of 48.
    # F1: t=0.2 gives TP 4, FP 2 -> P 2/3, R 1 -> 0.8 (best; t=0.5: 0.75, t=0.8: 2/3).
    score, mask = toy_pair()
    expected = {"pixel_auroc": 45 / 48, "aupro": 19 / 24, "pixel_f1_max": 0.8}
    assert pixel_metrics([score], [mask]) == pytest.approx(expected)
    assert aupro([score], [mask]) == pytest.approx(19 / 24)


def test_pro_curve_groups_ties() -> None:
    score, mask = toy_pair()
    region = np.where(mask, 0.5, 0.0).ravel()  # both components have 2 pixels
    fpr, pro = pro_curve(score.ravel(), (~mask).ravel().astype(float), region, 2)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 12, 1 / 12, 2 / 12, 2 / 12, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.5, 0.5, 0.75, 0.75, 1, 1])


def test_region_weights_join_diagonal_neighbours() -> None:
    mask = np.array([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=bool)
    weights, count = region_weights(mask)  # the diagonal pair is one 8-connected component
    assert count == 2
    np.testing.assert_allclose(weights, np.where(mask, 0.5, 0.0))


def test_area_up_to_interpolates_at_the_limit() -> None:
    # [0, 0.2]: (0 + 0.5)/2 * 0.2 = 0.05; y(0.3) = 0.5 + 0.5*(0.9-0.5) = 0.7; [0.2, 0.3]: 0.6*0.1 = 0.06.
    x, y = np.array([0.0, 0.2, 0.4, 1.0]), np.array([0.0, 0.5, 0.9, 1.0])
    assert area_up_to(x, y, MAX_FPR) == pytest.approx(0.11)


def test_aupro_constant_perfect_and_inverse_maps() -> None:
    _, mask = toy_pair()
    # One tie at every pixel: the curve is the straight line (0,0)-(1,1); area to 0.3 = 0.045 -> 0.15.
    assert aupro([np.full((4, 4), 0.5)], [mask]) == pytest.approx(0.15)
    assert aupro([mask.astype(float)], [mask]) == pytest.approx(1.0)
    inverse = pixel_metrics([1.0 - mask], [mask])  # every good pixel outranks every defect pixel
    assert inverse["aupro"] == pytest.approx(0.0)
    assert inverse["pixel_auroc"] == pytest.approx(0.0)


def test_streaming_equals_direct_on_float16_exact_scores() -> None:
    rng = np.random.default_rng(0)
    masks = blob_masks(rng, 5, (12, 16))
    maps = [rng.integers(0, 256, size=(12, 16)) / 256 for _ in masks]  # k/256 is exact in float16
    maps[0][masks[0]] += 0.25  # make the metrics non-trivial
    stream = PixelMetrics()
    for score_map, mask in zip(maps, masks, strict=True):
        stream.add(score_map, mask)
    streamed, direct = stream.compute(), pixel_metrics(maps, masks)
    for name in ("pixel_auroc", "aupro", "pixel_f1_max"):
        assert streamed[name] == pytest.approx(direct[name], abs=1e-12)
    assert (streamed["pixel_long_side"], streamed["pixel_maps"], streamed["pixel_masks_emptied"]) == (
        256,
        5,
        0,
    )


def test_streaming_close_to_direct_on_continuous_scores() -> None:
    rng = np.random.default_rng(1)
    masks = blob_masks(rng, 4, (20, 20))
    maps = [rng.random((20, 20)) + 0.5 * mask for mask in masks]
    stream = PixelMetrics()
    for score_map, mask in zip(maps, masks, strict=True):
        stream.add(score_map, mask)
    streamed, direct = stream.compute(), pixel_metrics(maps, masks)
    for name in ("pixel_auroc", "aupro", "pixel_f1_max"):
        assert streamed[name] == pytest.approx(direct[name], abs=2e-3)  # float16 step is 2^-11 relative


def test_streaming_resizes_by_area_to_the_long_side() -> None:
    rng = np.random.default_rng(2)
    small_masks = blob_masks(rng, 2, (128, 256))
    small_maps = [rng.integers(0, 256, size=(128, 256)) / 256 + 0.5 * m for m in small_masks]
    block = np.ones((2, 2))
    stream = PixelMetrics()
    for small_map, small_mask in zip(small_maps, small_masks, strict=True):
        # 2x2 blocks of one value: area averaging back to 128x256 recovers the small pair exactly.
        stream.add(np.kron(small_map, block), np.kron(small_mask, block).astype(bool))
    streamed, direct = stream.compute(), pixel_metrics(small_maps, small_masks)
    for name in ("pixel_auroc", "aupro", "pixel_f1_max"):
        assert streamed[name] == pytest.approx(direct[name], abs=1e-12)


def test_streaming_counts_masks_emptied_by_the_resize() -> None:
    lonely = np.zeros((512, 512), dtype=bool)
    lonely[10, 10] = True  # covers 1/4 of a 256x256 pixel: below the 0.5 area rule
    score, mask = toy_pair()
    stream = PixelMetrics()
    stream.add(np.zeros((512, 512)), lonely)
    stream.add(score, mask)
    assert stream.compute()["pixel_masks_emptied"] == 1


def test_streaming_state_is_constant_size() -> None:
    stream = PixelMetrics()
    state_bytes = sum(v.nbytes for v in vars(stream).values() if isinstance(v, np.ndarray))
    rng = np.random.default_rng(3)
    for mask in blob_masks(rng, 20, (300, 400)):
        stream.add(rng.random((300, 400)), mask)
    assert sum(v.nbytes for v in vars(stream).values() if isinstance(v, np.ndarray)) == state_bytes
    assert state_bytes < 2 * 2**20  # well inside the 1 GB budget for 2,000 maps


def test_float16_keys_follow_numeric_order() -> None:
    values = np.array([-70.0, -1.5, -0.0, 0.0, 1e-4, 0.5, 0.5, 3.0, 6e4])
    keys = float16_keys(values)
    assert np.all(np.diff(keys) >= 0)
    assert keys[2] == keys[3] and keys[5] == keys[6]  # -0 and +0 tie, equal values tie
    assert np.count_nonzero(np.diff(keys)) == 6


def test_pixel_metrics_reject_bad_input() -> None:
    score, mask = toy_pair()
    stream = PixelMetrics()
    with pytest.raises(ValueError, match="must be bool"):
        stream.add(score, mask.astype(np.uint8))
    with pytest.raises(ValueError, match="same"):
        stream.add(score[:3], mask)
    with pytest.raises(ValueError, match="NaN"):
        stream.add(np.full((4, 4), np.nan), mask)
    with pytest.raises(ValueError, match="float16 range"):
        stream.add(score * 1e6, mask)
    stream.add(score, np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="defect region"):
        stream.compute()
