"""Image, verdict and pixel metrics; scikit-learn computes all but AUPRO.

Pixel metrics are accumulated in a `PixelMetrics` stream: each map is resized to at most
`PIXEL_METRIC_SIZE` pixels on its long side, quantised to float16 and folded into per-value
histograms, so memory stays ~2 MB whatever the number of maps and the result is exact for the
float16-rounded scores (see `PixelMetrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

PIXEL_METRIC_SIZE = 256  # long side, in pixels, at which pixel metrics are computed (MVTec practice)
MAX_FPR = 0.3  # AUPRO integration limit (Bergmann et al., MVTec AD)
_N_FLOAT16 = 1 << 16  # number of float16 bit patterns = histogram bins
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # as in the MVTec AD evaluation code


def _checked_binary(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels as bool, scores as float64) after checking shape, values and both classes."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"{what}: labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (good) or 1 (defective), got {np.unique(y)[:5]}")
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or inf")
    if y.all() or not y.any():
        raise ValueError(f"{what}: needs both good (0) and defective (1) samples, got only {int(y[0])}s")
    return y.astype(bool), s


def f1_max(labels: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """Best F1 over all thresholds of the precision-recall curve."""
    precision, recall, _ = precision_recall_curve(labels, scores, sample_weight=sample_weight)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image-level AUROC, AUPR (average precision, step-wise) and F1-max; labels 1 = defective."""
    y, s = _checked_binary(labels, scores, "image_metrics")
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
        "f1_max": f1_max(y, s),
    }


def verdict_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float | None]:
    """Accuracy, false-alarm rate (good flagged) and recall (defective flagged) of hard verdicts.

    A rate over an empty group (no good or no defective images) is None rather than NaN.
    """
    y = np.asarray(labels).ravel()
    p = np.asarray(predicted).ravel()
    if y.size != p.size or y.size == 0:
        raise ValueError(f"verdict_metrics: need equal, non-zero lengths, got {y.size} labels, {p.size} verdicts")
    if not (np.isin(y, (0, 1)).all() and np.isin(p, (0, 1)).all()):
        raise ValueError("verdict_metrics: labels and verdicts must be 0/1 or bool")
    y, p = y.astype(bool), p.astype(bool)
    return {
        "accuracy": float(np.mean(y == p)),
        "false_alarm_rate": float(p[~y].mean()) if (~y).any() else None,
        "recall": float(p[y].mean()) if y.any() else None,
    }


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1/|component| inside each 8-connected defect component, and the component count."""
    components, n_components = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(components.ravel())  # (n_components + 1,)
    inverse = np.zeros(sizes.size, dtype=np.float64)
    inverse[1:] = 1.0 / sizes[1:]
    return inverse[components], int(n_components)  # (H, W) float64


def pro_curve(
    scores: np.ndarray, good: np.ndarray, region: np.ndarray, n_components: int
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, highest first, starting at (0, 0).

    `good` counts good pixels and `region` sums 1/|component| of defect pixels per score entry, so
    PRO(t) = mean over components of the fraction of their pixels with score >= t.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    good_above = np.cumsum(good[order], dtype=np.float64)
    region_above = np.cumsum(region[order], dtype=np.float64)
    last_of_tie = np.append(np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1)
    fpr = np.concatenate(([0.0], good_above[last_of_tie] / good_above[-1]))
    pro = np.concatenate(([0.0], region_above[last_of_tie] / n_components))
    return fpr, pro


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max], interpolating the curve at exactly x_max."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # x is non-decreasing
    xs, ys = x[:inside], y[:inside]
    if xs[-1] < x_max:
        if inside == x.size:
            raise ValueError(f"area_up_to: curve ends at x={xs[-1]:.3g}, before x_max={x_max}")
        share = (x_max - x[inside - 1]) / (x[inside] - x[inside - 1])
        xs = np.append(xs, x_max)
        ys = np.append(ys, y[inside - 1] + share * (y[inside] - y[inside - 1]))
    return float(np.trapezoid(ys, xs))


def _pixel_summary(
    scores: np.ndarray, good: np.ndarray, defect: np.ndarray, region: np.ndarray, n_components: int
) -> dict[str, float]:
    """Pixel AUROC, AUPRO and F1-max from per-entry good/defect counts (entries may be tied scores)."""
    if good.sum() == 0 or n_components == 0:
        raise ValueError("pixel metrics need both good pixels and at least one defect region")
    labels = np.concatenate((np.zeros(scores.size), np.ones(scores.size)))
    both_scores = np.concatenate((scores, scores))
    weights = np.concatenate((good, defect)).astype(np.float64)
    kept = weights > 0
    labels, both_scores, weights = labels[kept], both_scores[kept], weights[kept]
    fpr, pro = pro_curve(scores, good, region, n_components)
    return {
        "pixel_auroc": float(roc_auc_score(labels, both_scores, sample_weight=weights)),
        "aupro": area_up_to(fpr, pro, MAX_FPR) / MAX_FPR,
        "pixel_f1_max": f1_max(labels, both_scores, sample_weight=weights),
    }


def _checked_pair(score_map: np.ndarray, mask: np.ndarray) -> None:
    """Raise ValueError unless score_map is a finite (H, W) map and mask a bool (H, W) array."""
    if score_map.ndim != 2 or score_map.shape != mask.shape:
        raise ValueError(f"score map {score_map.shape} and mask {mask.shape} must be the same (H, W) shape")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool (use eval.datasets.load_mask or mask > 0), got {mask.dtype}")
    if not np.isfinite(score_map).all():
        raise ValueError("score map contains NaN or inf")


def pixel_metrics(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, float]:
    """Exact pixel AUROC, AUPRO and F1-max at native resolution; for few maps (holds every pixel)."""
    if len(score_maps) != len(masks) or not score_maps:
        raise ValueError(f"pixel_metrics: got {len(score_maps)} maps and {len(masks)} masks")
    regions, n_components = [], 0
    for score_map, mask in zip(score_maps, masks, strict=True):
        _checked_pair(np.asarray(score_map), np.asarray(mask))
        weights, count = region_weights(mask)
        regions.append(weights.ravel())
        n_components += count
    scores = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in score_maps])
    defect = np.concatenate([np.asarray(m).ravel() for m in masks])
    return _pixel_summary(scores, ~defect, defect, np.concatenate(regions), n_components)


def aupro(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Exact AUPRO (FPR <= MAX_FPR, normalised to [0, 1]) at native resolution."""
    return pixel_metrics(score_maps, masks)["aupro"]


def resized_pair(score_map: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrink map (area average) and mask (area > 0.5) so the long side is at most `size`."""
    height, width = mask.shape
    if max(height, width) <= size:
        return score_map.astype(np.float32), mask
    scale = size / max(height, width)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (W, H)
    small_map = cv2.resize(score_map.astype(np.float32), target, interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(mask.astype(np.float32), target, interpolation=cv2.INTER_AREA) > 0.5
    return small_map, small_mask  # (h, w) float32, (h, w) bool


def float16_keys(values: np.ndarray) -> np.ndarray:
    """Map float16 values to uint16 keys whose integer order is the numeric order."""
    bits = (values.astype(np.float16) + np.float16(0)).view(np.uint16)  # + 0 turns -0 into +0
    return np.where(bits & 0x8000, ~bits, bits | 0x8000).astype(np.int64)


class PixelMetrics:
    """Streaming pixel AUROC, AUPRO and F1-max over any number of (score map, mask) pairs.

    Each pair is shrunk to at most `size` pixels on the long side (maps by area averaging, masks
    by area fraction > 0.5; smaller images stay native), scores are rounded to float16 (relative
    step 2^-11) and folded into three 65,536-bin histograms keyed by the float16 value: good
    pixel counts, defect pixel counts and per-component defect weights 1/|component|. The
    metrics are then exact for the rounded scores, in constant memory. Defect components are
    8-connected regions of each resized mask; `pixel_masks_emptied` counts masks whose defect
    vanished in the resize.
    """

    def __init__(self, size: int = PIXEL_METRIC_SIZE) -> None:
        if size < 1:
            raise ValueError(f"PixelMetrics size must be >= 1, got {size}")
        self.size = size
        self._good = np.zeros(_N_FLOAT16, dtype=np.int64)
        self._defect = np.zeros(_N_FLOAT16, dtype=np.int64)
        self._region = np.zeros(_N_FLOAT16, dtype=np.float64)
        self._n_components = 0
        self._n_maps = 0
        self._n_emptied = 0

    def add(self, score_map: np.ndarray, mask: np.ndarray) -> None:
        """Fold one (H, W) float score map and its (H, W) bool ground-truth mask into the totals."""
        _checked_pair(score_map, mask)
        small_map, small_mask = resized_pair(score_map, mask, self.size)
        if np.abs(small_map).max() > np.finfo(np.float16).max:
            raise ValueError(f"score map values exceed the float16 range (|s| <= 65504): max {small_map.max()}")
        keys = float16_keys(small_map).ravel()
        defect = small_mask.ravel()
        weights, n_components = region_weights(small_mask)
        self._good += np.bincount(keys[~defect], minlength=_N_FLOAT16)
        self._defect += np.bincount(keys[defect], minlength=_N_FLOAT16)
        self._region += np.bincount(keys, weights=weights.ravel(), minlength=_N_FLOAT16)
        self._n_components += n_components
        self._n_maps += 1
        self._n_emptied += int(mask.any() and not small_mask.any())

    def compute(self) -> dict[str, float]:
        """Pixel AUROC, AUPRO, F1-max, plus the long side used, map count and emptied-mask count."""
        used = np.flatnonzero(self._good + self._defect)  # keys present; their order = score order
        summary = _pixel_summary(
            used.astype(np.float64),
            self._good[used],
            self._defect[used],
            self._region[used],
            self._n_components,
        )
        return summary | {
            "pixel_long_side": self.size,
            "pixel_maps": self._n_maps,
            "pixel_masks_emptied": self._n_emptied,
        }
