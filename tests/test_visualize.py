"""Tests for anomalygpt.visualize: colour scale, blend, boxes and labels, banner, figure and atomic save."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from anomalygpt.inspection import Inspection
from anomalygpt.regions import Region, find_regions
from anomalygpt.verdict import ONE_REFERENCE_CAVEAT, ZERO_SHOT_TEXT_CAVEAT, fit_warning, query_warnings
from anomalygpt.visualize import (
    ANOMALOUS_COLOR,
    BOX_COLOR,
    EVIDENCE_GAP,
    FONT,
    NORMAL_COLOR,
    WARNING_COLOR,
    banner_lines,
    draw_region,
    enlargement,
    evidence_pair,
    heat_colors,
    inspection_figure,
    inspection_scale,
    label_place,
    legend_strip,
    overlay,
    pen_for,
    save_overlay,
    verdict_banner,
    warning_line,
    warning_strip,
)


def block_map(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W) float32 zeros with 1.0 inside the box (x0, y0, x1, y1), x1/y1 exclusive."""
    scores = np.zeros((height, width), dtype=np.float32)
    x0, y0, x1, y1 = box
    scores[y0:y1, x0:x1] = 1.0
    return scores


def changed(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels that differ between two (H, W, 3) pictures."""
    return np.nonzero(np.any(a != b, axis=2))


def make_inspection(height: int, width: int, box: tuple[int, int, int, int], is_anomalous: bool) -> Inspection:
    """An Inspection built by hand: a block map thresholded at 0.5, normal mean 0.2, threshold 0.5."""
    scores = block_map(height, width, box) * 0.9 + 0.1
    regions = find_regions(scores, 0.5) if is_anomalous else []
    return Inspection(
        is_anomalous=is_anomalous,
        score=0.9 if is_anomalous else 0.1,
        threshold=0.5,
        margin=4.0 if is_anomalous else -4.0,
        confidence="high",
        pixel_threshold=0.5,
        regions=regions,
        mode="few-shot",
        n_references=2,
        image_size=(height, width),
        calibration={"normal_mean": 0.2, "image_threshold": 0.5},
        anomaly_map=scores,
    )


def test_heat_colors_map_vmin_and_vmax_to_the_colormap_ends_and_clip() -> None:
    scores = np.array([[1.0, 3.0], [-7.0, 9.0]])
    colors = heat_colors(scores, vmin=1.0, vmax=3.0, cmap="jet")
    # jet(0) = (0, 0, 0.5), jet(1) = (0.5, 0, 0); 0.5 * 255 = 127.5 rounds to 128.
    assert colors.dtype == np.uint8 and colors.shape == (2, 2, 3)
    assert colors[0, 0].tolist() == [0, 0, 128] and colors[1, 0].tolist() == [0, 0, 128]
    assert colors[0, 1].tolist() == [128, 0, 0] and colors[1, 1].tolist() == [128, 0, 0]


def test_heat_colors_reject_an_empty_scale() -> None:
    with pytest.raises(ValueError, match="vmin < vmax"):
        heat_colors(np.zeros((4, 4)), vmin=1.0, vmax=1.0)


def test_overlay_blends_the_heat_map_over_the_image_without_touching_it() -> None:
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    scores = np.full((40, 60), 0.3, dtype=np.float32)
    scores[:, 20:40] = 0.475  # a quarter up the scale: half the heat
    scores[:, 40:] = 0.8  # above the midpoint (the threshold): all of it
    picture = overlay(image, scores, [], vmin=0.3, vmax=1.0, alpha=0.5)
    assert picture.shape == (40, 60, 3) and picture.dtype == np.uint8
    assert np.all(picture[:, :20] == 100)  # at the normal mean the product shows as it is
    quarter = np.rint(0.75 * 100 + 0.25 * heat_colors(scores[:1, 20:21], 0.3, 1.0)[0, 0]).astype(np.uint8)
    assert np.all(picture[:, 20:40] == quarter)
    full = np.rint(0.5 * 100 + 0.5 * heat_colors(scores[:1, 40:41], 0.3, 1.0)[0, 0]).astype(np.uint8)
    assert np.all(picture[:, 40:] == full)
    assert np.all(image == 100)


def test_overlay_draws_a_box_on_the_region_edges_and_a_label_above_it() -> None:
    height, width, box = 200, 300, (100, 60, 180, 120)
    scores = block_map(height, width, box)
    regions = find_regions(scores, 0.5)
    assert [(r.box, r.location) for r in regions] == [(box, "center")]
    image = np.full((height, width, 3), 100, dtype=np.uint8)  # the labels' black background shows on it
    plain = overlay(image, scores, [], vmin=0.0, vmax=2.0)
    boxed = overlay(image, scores, regions, vmin=0.0, vmax=2.0)
    white = np.all(boxed == np.array(BOX_COLOR, dtype=np.uint8), axis=2)  # (H, W)
    assert pen_for(height, width).thickness == 1
    assert white[60:120, 100].all() and white[60:120, 179].all()  # left and right edges, x1 exclusive
    assert white[119, 100:180].all() and white[60, 100:180].all()  # bottom and top edges
    assert not white[61:119, 101:179].any()  # the inside keeps its heat colour
    rows, cols = changed(plain, boxed)
    pen = pen_for(height, width)
    (text_w, text_h), baseline = cv2.getTextSize("1 center", FONT, pen.font_scale, pen.text_thickness)
    label_h = text_h + baseline + 2
    # The label sits on the box's top-left corner, exactly as wide as "1 center" plus padding.
    assert rows.min() == 60 - label_h and rows.max() == 119
    assert cols.min() == 100 and cols.max() == max(179, 100 + text_w + 1)
    label_cols = cols[rows < 60]
    assert label_cols.min() == 100 and label_cols.max() == 100 + text_w + 1


def test_labels_stay_inside_the_picture_at_the_top_right_corner() -> None:
    height, width, box = 120, 160, (130, 0, 160, 30)
    scores = block_map(height, width, box)
    regions = find_regions(scores, 0.5)
    image = np.full((height, width, 3), 100, dtype=np.uint8)
    plain = overlay(image, scores, [], vmin=0.0, vmax=2.0)
    rows, cols = changed(plain, overlay(image, scores, regions, vmin=0.0, vmax=2.0))
    pen = pen_for(height, width)
    (text_w, _), _ = cv2.getTextSize("1 top right", FONT, pen.font_scale, pen.text_thickness)
    # No room above the box: the label goes inside it, shifted left so it ends at the right border.
    assert rows.min() == 0 and cols.max() == width - 1
    assert cols.min() == width - (text_w + 2)


def test_pen_grows_with_the_picture() -> None:
    small, large = pen_for(128, 128), pen_for(2000, 3000)
    assert (small.thickness, small.font_scale, small.text_thickness) == (1, 0.4, 1)
    assert (large.thickness, large.font_scale, large.text_thickness) == (8, 3.125, 5)


def test_overlay_rejects_a_map_of_another_size() -> None:
    with pytest.raises(ValueError, match=r"anomaly map \(10, 10\) does not match the image \(12, 10\)"):
        overlay(np.zeros((12, 10, 3), np.uint8), np.zeros((10, 10)), [], vmin=0.0, vmax=1.0)


def test_banner_lines_put_the_verdict_first() -> None:
    assert banner_lines(True, 0.61234, 0.5, 2.345, 2) == [
        "ANOMALOUS - 2 regions",
        "score 0.6123 > threshold 0.5000, margin +2.3",
    ]
    assert banner_lines(False, 0.25, 0.5, -3.0, 0) == ["NORMAL", "score 0.2500 <= threshold 0.5000, margin -3.0"]
    with_p = banner_lines(False, 0.25, 0.5, -3.0, 0, p_value=0.4567)  # a conformal threshold's p-value
    assert with_p == ["NORMAL", "score 0.2500 <= threshold 0.5000, margin -3.0, p 0.457"]


@pytest.mark.parametrize(("width", "is_anomalous"), [(120, True), (512, False), (1600, True)])
def test_verdict_banner_colour_and_text_fit_the_width(width: int, is_anomalous: bool) -> None:
    strip = verdict_banner(width, is_anomalous=is_anomalous, score=0.61234, threshold=0.5, margin=12.5, n_regions=3)
    background = np.array(ANOMALOUS_COLOR if is_anomalous else NORMAL_COLOR, dtype=np.uint8)
    pad = max(4, round(0.02 * width))
    assert strip.shape[1:] == (width, 3) and strip.dtype == np.uint8
    assert np.all(strip[:, :pad] == background) and np.all(strip[:, width - pad :] == background)
    assert np.any(strip != background)  # the text is there


def test_inspection_scale_puts_the_threshold_at_the_middle() -> None:
    inspection = make_inspection(32, 32, (0, 0, 8, 8), is_anomalous=True)
    assert inspection_scale(inspection) == pytest.approx((0.2, 0.8))


def test_enlargement_is_the_whole_factor_that_reaches_the_figure_width() -> None:
    assert enlargement(np.zeros((10, 10, 3), np.uint8)) == 52  # ceil(512 / 10)
    assert enlargement(np.zeros((600, 700, 3), np.uint8)) == 1


def test_an_enlarged_overlay_is_the_overlay_of_the_enlarged_picture() -> None:
    """overlay(factor=f) blends at the image's own size and enlarges after: pixel for pixel what blending the
    enlarged image, map and boxes gives (nearest neighbour commutes with a per-pixel blend)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    scores = rng.normal(0.5, 0.3, (30, 40))
    scores[0, :3] = [np.nan, np.inf, -np.inf]
    regions = [
        Region(1, (2, 3, 12, 9), 40, 1.0, (5.0, 6.0), "top left", 1.0, 1.0, "compact", "similar", "small"),
        Region(2, (25, 20, 38, 29), 60, 0.9, (24.0, 31.0), "bottom right", 1.0, 1.0, "compact", "darker", "small"),
    ]
    factor = 7
    big_image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    big_map = np.repeat(np.repeat(scores, factor, axis=0), factor, axis=1)
    big_regions = [dataclasses.replace(r, box=tuple(v * factor for v in r.box)) for r in regions]
    expected = overlay(big_image, big_map, big_regions, vmin=0.2, vmax=0.9)
    assert np.array_equal(overlay(image, scores, regions, vmin=0.2, vmax=0.9, factor=factor), expected)
    assert not np.array_equal(overlay(image, scores, [], vmin=0.2, vmax=0.9, factor=factor), expected)  # boxes drawn


@pytest.mark.parametrize("cmap", ["jet", "inferno"])
def test_heat_colors_are_matplotlibs_own_colours(cmap: str) -> None:
    """The lookup table gives what the colormap itself gives, at both ends and on the edges between entries."""
    from matplotlib import colormaps

    n = colormaps[cmap].N
    unit = np.concatenate([np.linspace(0.0, 1.0, 10_001), np.arange(n + 1) / n, np.nextafter(np.arange(1, n) / n, 0)])
    expected = np.rint(colormaps[cmap](unit)[:, :3] * 255.0).astype(np.uint8)
    assert np.array_equal(heat_colors(unit[None], 0.0, 1.0, cmap)[0], expected)


def test_save_overlay_writes_the_figure_atomically(tmp_path: Path) -> None:
    inspection = make_inspection(64, 64, (8, 40, 24, 56), is_anomalous=True)
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    figure = inspection_figure(image, inspection)
    banner = verdict_banner(512, is_anomalous=True, score=0.9, threshold=0.5, margin=4.0, n_regions=1)
    legend = legend_strip(512, 0.2, 0.8, 0.5)
    assert figure.shape == (banner.shape[0] + 512 + legend.shape[0], 512, 3)  # 64 px enlarged 8 times
    assert np.array_equal(figure[: banner.shape[0]], banner) and np.array_equal(figure[-legend.shape[0] :], legend)
    target = tmp_path / "x_overlay.png"
    target.write_bytes(b"old")
    assert save_overlay(target, image, inspection) == target
    assert np.array_equal(np.asarray(Image.open(target)), figure)
    assert [p.name for p in tmp_path.iterdir()] == ["x_overlay.png"]  # no temp file left behind


def test_save_overlay_without_a_map_writes_nothing(tmp_path: Path) -> None:
    inspection = make_inspection(32, 32, (0, 0, 8, 8), is_anomalous=False)
    inspection.anomaly_map = None
    with pytest.raises(ValueError, match="no anomaly map"):
        save_overlay(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8), inspection)
    assert list(tmp_path.iterdir()) == []


def test_labels_never_overlap_each_other_and_stay_in_the_picture() -> None:
    height, width = 200, 300
    scores = np.zeros((height, width), dtype=np.float32)
    for x in range(10, 290, 25):  # a row of small blobs whose labels would all sit on one line
        scores[40:60, x : x + 15] = 1.0
    scores[2:10, 5:295] = 1.0  # and a wide one at the very top: its label cannot go above it
    regions = find_regions(scores, 0.5)
    assert len(regions) == 13
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    taken: list[tuple[int, int, int, int]] = []
    pen = pen_for(height, width)
    for region in regions:
        draw_region(canvas, region, pen, taken)
    assert len(taken) == 13
    for i, (left, top, right, bottom) in enumerate(taken):
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        for other in taken[i + 1 :]:
            assert not (left < other[2] and other[0] < right and top < other[3] and other[1] < bottom)


def test_a_label_avoids_other_boxes_where_it_can() -> None:
    # Region 2's box sits right above region 1's: the first choice (above box 1) would cover it.
    above, below = (50, 20, 150, 40), (50, 44, 150, 80)
    rect = label_place(below, (60, 14), (200, 300), taken=[], boxes=[above])
    assert not (rect[0] < above[2] and above[0] < rect[2] and rect[1] < above[3] and above[1] < rect[3])
    assert rect[1] == 80  # just below its own box, the next choice
    assert label_place(below, (60, 14), (200, 300), taken=[])[1] == 30  # with nothing to avoid: above the box


def test_the_legend_marks_the_threshold_on_the_scale() -> None:
    strip = legend_strip(600, vmin=0.2, vmax=0.8, threshold=0.5)
    assert strip.shape[1] == 600 and strip.dtype == np.uint8
    pad = 12  # 2% of the width
    bar = strip[pad + 2, pad : 600 - pad]  # a row of the bar
    black = np.flatnonzero(np.all(bar == 0, axis=1))  # the tick
    assert black.size and abs(black.mean() - (600 - 2 * pad - 1) / 2) <= 1  # the threshold is the midpoint
    assert bar[0].tolist() == heat_colors(np.array([[0.2]]), 0.2, 0.8)[0, 0].tolist()  # the scale starts cold
    assert bar[-1].tolist() == heat_colors(np.array([[0.8]]), 0.2, 0.8)[0, 0].tolist()  # and ends hot


def test_the_banner_is_never_drawn_over() -> None:
    inspection = make_inspection(64, 64, (0, 0, 40, 12), True)  # a region touching the top border
    figure = inspection_figure(np.zeros((64, 64, 3), np.uint8), inspection)
    picture_width = figure.shape[1]
    banner = verdict_banner(
        picture_width, is_anomalous=True, score=0.9, threshold=0.5, margin=4.0, n_regions=len(inspection.regions)
    )
    assert np.array_equal(figure[: banner.shape[0]], banner)  # labels are drawn inside the picture only


def test_evidence_pair_puts_the_defect_beside_its_good_match_at_one_scale() -> None:
    query = np.full((100, 100, 3), 120, np.uint8)
    query[40:50, 40:60] = 20  # a dark defect, 20 x 10 px
    reference = np.full((100, 100, 3), 120, np.uint8)
    pair = evidence_pair(query, reference, (40, 40, 60, 50), (40, 40, 60, 50), side=96)
    assert pair.shape == (96, 2 * 96 + EVIDENCE_GAP, 3)
    left, right = pair[:, :96], pair[:, 96 + EVIDENCE_GAP :]
    assert (left == 20).all(axis=2).sum() > 0 and not (right == 20).all(axis=2).any()  # the defect is on the left
    assert (left == 255).all(axis=2).sum() == (right == 255).all(axis=2).sum() > 0  # the same box on both sides


def test_a_query_unlike_its_references_gets_a_warning_strip_under_the_banner() -> None:
    inspection = make_inspection(64, 64, (8, 40, 24, 56), is_anomalous=True)
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    fitting = inspection_figure(image, inspection)
    inspection.reference_fit = {"fits": True, "ratio": 1.2, "brightness": 0.3}
    assert np.array_equal(inspection_figure(image, inspection), fitting)
    inspection.reference_fit = {"fits": False, "ratio": 7.25, "brightness": 0.3}
    inspection.warnings = [str(fit_warning(inspection.reference_fit))]
    figure = inspection_figure(image, inspection)
    banner = verdict_banner(512, is_anomalous=True, score=0.9, threshold=0.5, margin=4.0, n_regions=1)
    strip = warning_strip(512, "WARNING: does not look like the good references (7.2x their spacing)")
    assert figure.shape[0] == fitting.shape[0] + strip.shape[0]
    assert np.array_equal(figure[: banner.shape[0]], banner)
    assert np.array_equal(figure[banner.shape[0] : banner.shape[0] + strip.shape[0]], strip)
    assert np.all(strip[:, :4] == WARNING_COLOR) and np.any(strip == 0)  # amber, with black text
    assert np.array_equal(figure[banner.shape[0] + strip.shape[0] :], fitting[banner.shape[0] :])
    darker = {"fits": False, "ratio": 1.5, "brightness": -5.04}
    assert warning_line([str(fit_warning(darker))], darker) == (
        "WARNING: does not look like the good references (5.0 spreads off their brightness)"
    )


def test_every_warning_that_breaks_trust_is_drawn_and_the_set_s_notes_are_not() -> None:
    """The strip shows the first warning that makes the verdict untrustworthy (one reference, no references, the
    query is a reference, blank, too small) and counts the others; a duplicate reference counted once is not one."""
    pixels = np.full((20, 20, 3), 128, np.uint8)  # blank and small
    same = {"distance": 0.0, "ratio": 0.0, "brightness": 0.0, "fits": True, "nearest": ["good3.png"]}
    warnings = query_warnings(pixels, same, 320)
    assert len(warnings) == 3
    assert warning_line(warnings, same) == "WARNING: the image is one of the references (+2 more: see the record)"
    assert warning_line(warnings[1:], same) == "WARNING: blank image, no product (+1 more: see the record)"
    assert warning_line([ONE_REFERENCE_CAVEAT], None) == "WARNING: one reference: a rough threshold"
    assert warning_line([ZERO_SHOT_TEXT_CAVEAT], None) == "WARNING: no references: a weak verdict"
    duplicates = "2 references are the same picture (a.png, b.png): counted once"
    assert warning_line([duplicates], None) is None
    assert warning_line([duplicates, ONE_REFERENCE_CAVEAT], None) == "WARNING: one reference: a rough threshold"
    inspection = make_inspection(64, 64, (8, 40, 24, 56), is_anomalous=False)
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    plain = inspection_figure(image, inspection)
    inspection.warnings = [ZERO_SHOT_TEXT_CAVEAT]
    assert inspection_figure(image, inspection).shape[0] > plain.shape[0]  # the normal verdict gets its strip too
