"""Tests for anomalygpt.regions: hand-built maps whose components are known by construction."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from scipy import ndimage
from skimage import morphology

from anomalygpt import regions
from anomalygpt.regions import (
    LOCATION_WORDS,
    Region,
    default_min_area_px,
    find_regions,
    format_pct,
    h_maxima,
    location_word,
    map_cell_px,
    regions_summary,
    shape_word,
    size_word,
)


def two_blob_map() -> np.ndarray:
    """(60, 90) map: a 5x10 blob at the top left (one hot pixel) and a 10x15 blob at the bottom right."""
    scores = np.zeros((60, 90))
    scores[10:15, 20:30] = 0.6
    scores[12, 25] = 0.9
    scores[40:50, 60:75] = 0.7
    return scores


def rect_pixels(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a filled height x width rectangle."""
    rows, cols = np.nonzero(np.ones((height, width), dtype=bool))
    return rows, cols


def test_two_components_count_order_box_area_centroid_scores() -> None:
    big, small = find_regions(two_blob_map(), threshold=0.5)
    assert (big.index, small.index) == (1, 2)
    assert big.box == (60, 40, 75, 50) and small.box == (20, 10, 30, 15)
    assert (big.area_px, small.area_px) == (150, 50)
    assert big.area_pct == pytest.approx(100 * 150 / 5400)
    assert small.area_pct == pytest.approx(100 * 50 / 5400)
    # Pixel (i, j) covers [j, j+1) x [i, i+1): a filled box's centroid is its box centre.
    assert big.centroid == (67.5, 45.0) and small.centroid == (25.0, 12.5)
    assert (big.location, small.location) == ("bottom right", "top left")
    assert small.peak_score == pytest.approx(0.9)
    assert small.mean_score == pytest.approx((49 * 0.6 + 0.9) / 50)
    assert big.peak_score == pytest.approx(0.7) and big.mean_score == pytest.approx(0.7)


def test_opposite_corners_get_their_own_location_words() -> None:
    # The original took the centre of the union of all boxes, which would call both "center".
    scores = np.zeros((30, 30))
    scores[1:4, 1:4] = 1.0
    scores[25:29, 25:29] = 1.0
    regions = find_regions(scores, threshold=0.5)
    assert [r.location for r in regions] == ["bottom right", "top left"]


def test_nine_regions_one_per_grid_cell_get_all_nine_words() -> None:
    scores = np.zeros((90, 90))
    for cell in range(9):
        side = 2 + cell  # distinct areas 4..100 so the largest-first order is known
        cy, cx = 15 + 30 * (cell // 3), 15 + 30 * (cell % 3)
        scores[cy - side // 2 : cy - side // 2 + side, cx - side // 2 : cx - side // 2 + side] = 1.0
    regions = find_regions(scores, threshold=0.0)
    assert [r.index for r in regions] == list(range(1, 10))
    assert [r.area_px for r in regions] == [(2 + c) ** 2 for c in reversed(range(9))]
    assert [r.location for r in regions] == list(reversed(LOCATION_WORDS))


@pytest.mark.parametrize(
    ("x", "y", "word"),
    [
        (29.99, 0.0, "top left"),
        (30.0, 0.0, "top"),
        (59.99, 19.99, "top"),
        (60.0, 19.99, "top right"),
        (0.0, 20.0, "left"),
        (45.0, 30.0, "center"),
        (89.0, 39.99, "right"),
        (0.0, 40.0, "bottom left"),
        (45.0, 59.0, "bottom"),
        (60.0, 40.0, "bottom right"),
    ],
)
def test_location_word_thirds_and_boundaries(x: float, y: float, word: str) -> None:
    assert location_word(x, y, width=90, height=60) == word


def test_location_word_rejects_empty_image() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        location_word(1.0, 1.0, width=0, height=10)


def test_threshold_edges() -> None:
    assert find_regions(np.full((20, 30), 0.4), threshold=0.5) == []
    assert find_regions(np.full((20, 30), 0.5), threshold=0.5) == []  # strictly above only
    (whole,) = find_regions(np.full((20, 30), 0.7), threshold=0.5)
    assert whole.box == (0, 0, 30, 20) and whole.area_px == 600
    assert whole.area_pct == pytest.approx(100.0)
    assert whole.centroid == (15.0, 10.0) and whole.location == "widespread"
    assert whole.size == "large" and whole.shape == "compact"
    assert whole.place() == "across most of the image" and whole.where() == "widespread"
    assert set(whole.places) == set(LOCATION_WORDS) | {"widespread"}


def test_diagonal_pixels_are_one_eight_connected_region() -> None:
    scores = np.zeros((20, 20))
    scores[np.arange(3, 9), np.arange(3, 9)] = 1.0
    (region,) = find_regions(scores, threshold=0.5)
    assert region.area_px == 6 and region.box == (3, 3, 9, 9)
    assert region.shape == "elongated"


def test_any_number_of_regions_with_ties_in_raster_order() -> None:
    scores = np.zeros((50, 50))
    for row in range(5):
        for col in range(5):
            scores[10 * row + 2 : 10 * row + 4, 10 * col + 2 : 10 * col + 4] = 1.0
    regions = find_regions(scores, threshold=0.5)
    assert len(regions) == 25 and [r.index for r in regions] == list(range(1, 26))
    assert regions[0].box == (2, 2, 4, 4) and regions[1].box == (12, 2, 14, 4)
    assert regions[-1].box == (42, 42, 44, 44)


def test_default_min_area_drops_specks() -> None:
    assert default_min_area_px(224, 224) == 6  # ceil(5.0176)
    assert default_min_area_px(1024, 1024) == 105
    assert default_min_area_px(30, 30) == 4  # the 4 px floor
    scores = np.zeros((30, 30))
    scores[2, 2:5] = 1.0  # 3 px: dropped by default
    scores[20:22, 20:22] = 1.0  # 4 px: kept
    assert [r.area_px for r in find_regions(scores, threshold=0.5)] == [4]
    assert [r.area_px for r in find_regions(scores, threshold=0.5, min_area_px=1)] == [4, 3]
    with pytest.raises(ValueError, match="min_area_px"):
        find_regions(scores, threshold=0.5, min_area_px=0)


def test_shape_word_ratio_boundaries() -> None:
    # Variance of a filled L-px side is L^2/12 (discrete (L^2-1)/12 plus 1/12 for the pixel itself).
    assert shape_word(*rect_pixels(10, 30)) == "elongated"  # ratio exactly 3
    assert shape_word(*rect_pixels(10, 29)) == "compact"  # ratio 2.9
    assert shape_word(*rect_pixels(1, 3)) == "elongated"  # a 3 px line: ratio 3, no division by ~0
    assert shape_word(*rect_pixels(1, 2)) == "compact"
    assert shape_word(np.array([5]), np.array([7])) == "compact"  # one pixel


def test_drawn_line_is_elongated_and_disk_is_compact() -> None:
    scores = np.zeros((100, 100), dtype=np.uint8)
    cv2.line(scores, (10, 80), (70, 20), color=1, thickness=2)
    cv2.circle(scores, (80, 80), radius=10, color=1, thickness=-1)
    regions = find_regions(scores.astype(np.float64), threshold=0.5)
    by_location = {r.location: r.shape for r in regions}
    assert by_location == {"center": "elongated", "bottom right": "compact"}


def contrast_of(blob_grey: int, rgb: bool = False) -> str:
    """Contrast word of a radius-8 disk of blob_grey on a mid-grey (128) image."""
    scores = np.zeros((100, 100), dtype=np.uint8)
    cv2.circle(scores, (50, 50), radius=8, color=1, thickness=-1)
    image = np.full((100, 100), 128, dtype=np.uint8)
    image[scores == 1] = blob_grey
    if rgb:
        image = np.repeat(image[:, :, None], 3, axis=2)
    (region,) = find_regions(scores.astype(np.float64), threshold=0.5, image=image)
    return region.contrast


def test_contrast_darker_brighter_similar() -> None:
    assert contrast_of(60) == "darker"
    assert contrast_of(60, rgb=True) == "darker"
    assert contrast_of(200) == "brighter"
    assert contrast_of(137) == "brighter"  # 9 grey levels
    assert contrast_of(136) == "similar"  # 8 grey levels is not beyond the limit
    assert contrast_of(120) == "similar"
    assert contrast_of(119) == "darker"


def test_contrast_ring_ignores_neighbouring_anomalies_and_missing_image() -> None:
    scores = np.zeros((60, 60))
    scores[20:30, 20:30] = 1.0  # region A, same grey as the background
    scores[15:35, 31:41] = 1.0  # region B, one px gap: inside A's 3 px ring
    image = np.full((60, 60), 128, dtype=np.uint8)
    image[15:35, 31:41] = 255
    big, small = find_regions(scores, threshold=0.5, image=image)
    assert (big.contrast, small.contrast) == ("brighter", "similar")
    assert [r.contrast for r in find_regions(scores, threshold=0.5)] == ["similar", "similar"]


def test_size_words_boundaries() -> None:
    assert [size_word(p) for p in (0.49, 0.5, 2.99, 3.0)] == ["small", "medium", "medium", "large"]


def test_to_dict_json_round_trip() -> None:
    regions = find_regions(two_blob_map(), threshold=0.5, image=np.zeros((60, 90, 3), dtype=np.uint8))
    for region in regions:
        data = region.to_dict()
        assert json.loads(json.dumps(data, allow_nan=False)) == data
        assert Region.from_dict(data).to_dict() == data
        assert data["box"] == list(region.box) and isinstance(data["area_px"], int)
    assert regions[1].to_dict()["area_pct"] == 0.9259  # 50 / 5400, rounded to 4 decimals
    assert regions[1].to_dict()["mean_score"] == 0.606


def test_describe_and_summary_text() -> None:
    region = Region(
        index=1,
        box=(0, 0, 10, 2),
        area_px=20,
        area_pct=0.8,
        centroid=(5.0, 1.0),
        location="top left",
        peak_score=0.9,
        mean_score=0.7,
        shape="elongated",
        contrast="darker",
        size="small",
    )
    assert region.describe() == "a small elongated darker region in the top left (0.8% of the image)"
    assert regions_summary([]) == "No anomalous region."
    assert regions_summary([region]) == (
        "1 anomalous region: a small elongated darker region in the top left (0.8% of the image)."
    )
    assert regions_summary(find_regions(two_blob_map(), threshold=0.5)) == (
        "2 anomalous regions: a medium compact region in the bottom right (2.8% of the image); "
        "a medium compact region in the top left (0.9% of the image)."
    )


def test_format_pct_digits() -> None:
    assert [format_pct(p) for p in (100.0, 12.3, 0.8, 0.043)] == ["100%", "12%", "0.8%", "0.043%"]


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"\(H, W\) array"):
        find_regions(np.zeros((4, 4, 3)), threshold=0.5)
    nan_map = np.zeros((20, 20))
    nan_map[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        find_regions(nan_map, threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        find_regions(np.zeros((20, 20)), threshold=float("nan"))
    with pytest.raises(ValueError, match="image must be uint8"):
        find_regions(np.zeros((20, 20)), threshold=0.5, image=np.zeros((20, 21), dtype=np.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        find_regions(np.zeros((20, 20)), threshold=0.5, image=np.zeros((20, 20, 4), dtype=np.uint8))


def two_peak_map(valley: float) -> np.ndarray:
    """(60, 120) map: Gaussian peaks of height 1.0 (left) and 0.95 (right) joined by a ridge at `valley`."""
    rows, cols = np.mgrid[0:60, 0:120]
    left = np.exp(-((rows - 30) ** 2 + (cols - 30) ** 2) / (2 * 8.0**2))
    right = 0.95 * np.exp(-((rows - 30) ** 2 + (cols - 90) ** 2) / (2 * 8.0**2))
    ridge = valley * np.exp(-((rows - 30) ** 2) / (2 * 4.0**2)) * ((cols > 30) & (cols < 90))
    return np.maximum(np.maximum(left, right), ridge)


def test_an_area_with_two_separate_peaks_is_two_regions() -> None:
    # Threshold 0.2, peak 1.0: the valley at 0.4 is 0.55 below the lower peak, more than half the 0.8 above it.
    first, second = find_regions(two_peak_map(valley=0.4), threshold=0.2)
    assert {first.location, second.location} == {"left", "right"}
    assert first.box[2] <= second.box[0] or second.box[2] <= first.box[0]  # side by side, not overlapping
    assert first.area_px + second.area_px == int(np.count_nonzero(two_peak_map(0.4) > 0.2))  # nothing lost
    (whole,) = find_regions(two_peak_map(valley=0.4), threshold=0.2, split_depth=None)
    assert whole.span == ("left", "center", "right") and whole.where() == "left to right"
    # A shallow dip (0.9, 0.05 below the lower peak) is one defect's ripple: one region.
    (ridge,) = find_regions(two_peak_map(valley=0.9), threshold=0.2)
    assert ridge.place() == "from the left to the right"


@pytest.mark.parametrize("labellings", [10**6, 0], ids=["labelled", "sorted"])
@pytest.mark.parametrize("seed", range(6))
def test_h_maxima_is_skimages_pixel_for_pixel(seed: int, labellings: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regions, "MAX_LABELLINGS", labellings)  # each way of computing it, on every map
    # Smoothed noise has many peaks at every height; rounding to a grid makes plateaus and exact ties, a
    # constant frame is the outside of a component as split_at_peaks crops it, the offset puts the values where
    # rounding of (image - h) differs from that of the image (and with seed 0 the top at exactly 0, where
    # skimage's resolution term vanishes), and a neighbour one float step above the top is a near tie.
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.normal(size=(70, 90)), sigma=seed % 3 + 1.5)
    if seed % 2:
        image = np.round(image, 2)
    image[:, :6] = image.min()
    image += 7.0 * seed if seed else -image.max()
    row, col = np.unravel_index(int(image[1:-1, 7:-1].argmax()), (68, 82))
    image[row + 2, col + 7] = np.nextafter(image[row + 1, col + 7], np.inf)
    for share in (0.02, 0.1, 0.3, 0.7, 1.5):
        h = share * float(np.ptp(image))
        ours, theirs = h_maxima(image, h), morphology.h_maxima(image, h)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), (seed, share)
        within = image > np.median(image)  # as split_at_peaks asks: only a component's pixels
        assert np.array_equal(h_maxima(image, h, within), theirs * within), (seed, share)
        assert (share > 1) == (ours.sum() == 0)  # a real test: maxima found for every h within the range


def test_the_contrast_rings_distance_is_scipys_euclidean_distance() -> None:
    # _contrast_word's ring is OpenCV's exact distance transform <= radius; scipy's is the reference.
    rng = np.random.default_rng(0)
    for share in (0.01, 0.2, 0.6):
        field = ndimage.gaussian_filter(rng.normal(size=(80, 110)), 3)
        outside = field <= np.quantile(field, 1 - share)  # components of `share` of the pixels
        ours = cv2.distanceTransform(outside.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        assert np.allclose(ours, ndimage.distance_transform_edt(outside), atol=1e-4)


def test_min_peak_keeps_only_regions_peaking_above_it() -> None:
    scores = two_blob_map()  # peaks 0.9 (top left) and 0.7 (bottom right)
    (strong,) = find_regions(scores, threshold=0.5, min_peak=0.8)
    assert strong.index == 1 and strong.location == "top left" and strong.peak_score == 0.9
    assert len(find_regions(scores, threshold=0.5, min_peak=0.69)) == 2
    assert find_regions(scores, threshold=0.5, min_peak=0.9) == []  # strictly above


def test_split_depth_is_checked() -> None:
    with pytest.raises(ValueError, match="split_depth"):
        find_regions(two_peak_map(0.4), threshold=0.2, split_depth=0.0)


def test_map_cell_px_is_one_backbone_cell_in_image_pixels() -> None:
    # Stride 8 on a 320 px input: a 300 x 300 image's cell is 7.5 x 7.5 px.
    assert map_cell_px(300, 300, stride=8, input_side=320) == 57
    assert map_cell_px(640, 320, stride=16, input_side=320) == 512
    with pytest.raises(ValueError, match="positive"):
        map_cell_px(300, 300, stride=0, input_side=320)


def test_a_region_spanning_cells_says_from_where_to_where() -> None:
    scores = np.zeros((90, 90))
    scores[5:80, 5:15] = 1.0  # a vertical bar down the left column
    (bar,) = find_regions(scores, threshold=0.5)
    assert bar.location == "left" and bar.span == ("top left", "left", "bottom left")
    assert bar.place() == "from the top left to the bottom left" and bar.where() == "top left to bottom left"
    assert set(bar.places) == {"top left", "left", "bottom left"}
    scores = np.zeros((90, 90))
    for i in range(70):  # a diagonal crack from the bottom left to the top right
        scores[80 - i : 83 - i, 5 + i : 8 + i] = 1.0
    (crack,) = find_regions(scores, threshold=0.5)
    assert crack.where() == "top right to bottom left"
    scores = np.zeros((90, 90))
    scores[40:50, 40:50] = 1.0
    (spot,) = find_regions(scores, threshold=0.5)
    assert spot.span == ("center",) and spot.place() == "in the center"  # one cell: as before
    assert Region.from_dict(json.loads(json.dumps(bar.to_dict()))).span == bar.span


def test_a_region_over_half_the_image_is_widespread() -> None:
    scores = np.zeros((60, 60))
    scores[:, :31] = 1.0  # 51.7 %
    (half,) = find_regions(scores, threshold=0.5)
    assert half.location == "widespread" and half.place() == "across most of the image"
    assert "across most of the image" in regions_summary([half])
    scores[:, 29:] = 0.0  # 48.3 %: a place again
    (left,) = find_regions(scores, threshold=0.5)
    assert left.location == "left"


def test_grid_span_reads_pixel_centres_exactly_as_the_float_formula() -> None:
    """grid_span's cells in integers are floor(3 (r + 0.5) / height) exactly: the float formula's cells on random
    regions of random image sizes, and on every row and column of small images (the thirds' edges)."""
    rng = np.random.default_rng(0)

    def by_floats(rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(3 * (rows + 0.5) // height, 2), np.minimum(3 * (cols + 0.5) // width, 2)

    cases = []
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(1, 2000, 2))
        n = int(rng.integers(1, 3000))
        cases.append((rng.integers(0, height, n), rng.integers(0, width, n), height, width))
    for side in range(1, 40):
        cases.append((np.arange(side), np.arange(side)[::-1], side, side))
    for rows, cols, height, width in cases:
        grid_rows, grid_cols = by_floats(rows, cols, height, width)
        expected = np.bincount(3 * grid_rows.astype(int) + grid_cols.astype(int), minlength=9)
        share = regions.SPAN_SHARE * min(rows.size, height * width / 9)
        chosen = np.flatnonzero(expected >= share) if (expected >= share).any() else [int(expected.argmax())]
        assert regions.grid_span(rows, cols, height, width) == tuple(regions.LOCATION_WORDS[i] for i in chosen)
