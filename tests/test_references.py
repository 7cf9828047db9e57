import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import texture_crops
from skimage import data

from anomalygpt.config import load_preset
from anomalygpt.inspection import InspectionError, Inspector
from anomalygpt.memory import MemoryConfig
from anomalygpt.references import (
    AUGMENT_GAIN,
    check_references,
    decide_augmentation,
    fit_statistics,
    reference_fit,
    simulated_defects,
)
from anomalygpt.verdict import BRIGHTNESS_LIMIT, FIT_LIMIT, FitStatistics, fit_warning


def grass_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    field = data.grass()
    corners = np.random.default_rng(seed).integers(0, field.shape[0] - 128, size=(n, 2))
    return [np.repeat(field[y : y + 128, x : x + 128, None], 3, axis=2) for y, x in corners]


@pytest.fixture(scope="module")
def inspector(small_backbone):
    preset = load_preset("default")
    return Inspector(
        small_backbone, dataclasses.replace(preset, memory=dataclasses.replace(preset.memory, augment=None))
    )


def test_the_same_picture_under_several_names_counts_once():
    crops = texture_crops(3, seed=2)
    noisy = (crops[0].astype(int) + np.random.default_rng(0).integers(-1, 2, crops[0].shape)).clip(0, 255)
    images = [crops[0], crops[1], crops[0].copy(), noisy.astype(np.uint8), crops[2]]
    names = ["a.png", "b.png", "a_copy.png", "a_noisy.png", "c.png"]
    found = check_references(images, names)
    assert found.keep == [0, 1, 4]
    assert found.warnings == ["3 references are the same picture (a.png, a_copy.png, a_noisy.png): counted once"]
    assert check_references(crops, ["1", "2", "3"]).warnings == []


def test_fine_textures_that_share_a_thumbnail_are_not_the_same_picture():
    # A brick wall tiled to 1536 px and shifted by 37 px: identical 32 px thumbnails, different pictures.
    wall = np.tile(data.brick(), (3, 3))
    shifted = [np.repeat(np.roll(wall, 37 * i, axis=1)[..., None], 3, axis=2) for i in range(3)]
    found = check_references(shifted, ["a", "b", "c"])
    assert found.keep == [0, 1, 2] and found.warnings == []


def test_blank_references_are_refused_by_name():
    crops = texture_crops(2)
    grey = np.full((128, 128, 3), 90, np.uint8)
    with pytest.raises(InspectionError, match="grey.png: blank reference"):
        check_references([crops[0], grey], ["a.png", "grey.png"])


def test_four_copies_behave_like_one_reference_never_like_a_perfect_one(inspector):
    crop = texture_crops(1, seed=3)[0]
    copies = inspector.fit([crop, crop.copy(), crop.copy(), crop.copy()], class_name="brick")
    one = inspector.fit([crop])
    assert copies.memory.n_references == 1 and copies.calibration == one.calibration
    assert copies.warnings[0].startswith("4 references are the same picture") and "one reference" in copies.warnings[1]
    good = inspector.inspect(texture_crops(1, seed=30)[0], copies)
    assert abs(good.margin) < 20  # four copies used to give a good crop +100 spreads
    assert good.warnings == copies.warnings  # every inspection carries them, fit warning first when there is one


def test_simulated_defects_change_only_a_small_area_darker_or_brighter():
    image = texture_crops(1)[0]
    defects = simulated_defects(image, np.random.default_rng(0))
    assert len(defects) == 4
    for defect, darker in zip(defects, (True, False, True, False), strict=True):
        changed = np.any(defect != image, axis=2)
        assert 0.002 < changed.mean() < 0.1
        delta = defect.astype(int)[changed] - image.astype(int)[changed]
        assert (delta < 0).all() if darker else (delta > 0).all()


def test_augmentation_is_decided_from_the_references_or_set_by_the_preset(small_backbone):
    rng = np.random.default_rng(0)
    forced, views = decide_augmentation(small_backbone, texture_crops(4), MemoryConfig(augment=False), rng)
    assert forced.augment is False and forced.reason == "set by the preset" and views == {}
    one, _ = decide_augmentation(small_backbone, texture_crops(1), MemoryConfig(), rng)
    assert one.augment is True and "one reference" in one.reason
    decided, views = decide_augmentation(small_backbone, texture_crops(4, seed=5), MemoryConfig(), rng)
    assert sorted(views) == [0, 1, 2, 3] and all(v.shape[0] == 8 for v in views[0])
    assert decided.separation_on > 1 and decided.separation_off > 1  # simulated defects score above good
    assert decided.augment == (decided.separation_on >= AUGMENT_GAIN * decided.separation_off)
    ratios = f"{decided.separation_on:.2f} with rotations/flips, {decided.separation_off:.2f} without"
    assert decided.reason.endswith(f"{ratios}; kept when 1.3 times as high or more")  # fit prints the rule too


def test_fit_statistics_are_the_mean_nearest_other_reference_distance_and_the_brightness():
    # Unit descriptors at 0, 10 and 30 degrees: nearest-other cosine distances 1 - cos 10, 1 - cos 10, 1 - cos 20.
    angles = torch.tensor([0.0, 10.0, 30.0]) * math.pi / 180
    appearances = torch.stack([angles.cos(), angles.sin()], dim=1)
    stats = fit_statistics(appearances, [100.0, 110.0, 120.0])
    typical = np.mean([1 - math.cos(math.radians(a)) for a in (10, 10, 20)])
    assert stats.n == 3 and stats.typical == pytest.approx(typical, rel=1e-5)
    assert stats.brightness == pytest.approx(110.0) and stats.brightness_spread == pytest.approx(10.0)
    assert fit_statistics(appearances[:1], [100.0]) == FitStatistics(0.0, 0)
    names = ["a", "b", "c"]
    query = torch.tensor([0.0, 1.0])  # 90 degrees: 1 - cos 60 = 0.5 from the nearest reference (30 degrees)
    fit = reference_fit(query, 110.0, appearances, stats, names)
    assert fit["distance"] == pytest.approx(0.5, abs=1e-4) and fit["nearest"] == ["c", "b", "a"]
    assert fit["ratio"] == pytest.approx(0.5 / typical, abs=0.01) and fit["ratio"] > FIT_LIMIT
    assert fit["fits"] is False and "times farther" in fit_warning(fit)
    close = reference_fit(appearances[1], 115.0, appearances, stats, names)
    assert close["ratio"] == 0 and close["brightness"] == 0.5 and close["fits"] is True and fit_warning(close) is None
    dark = reference_fit(appearances[1], 110.0 - 10.0 * (BRIGHTNESS_LIMIT + 0.5), appearances, stats, names)
    assert dark["fits"] is False and "4.5 spreads darker" in fit_warning(dark)
    alone = reference_fit(query, 110.0, appearances[:1], fit_statistics(appearances[:1], [110.0]), ["a"])
    assert alone["ratio"] is None and alone["fits"] is None and fit_warning(alone) is None


def test_a_query_of_another_product_is_warned_and_one_of_the_same_is_not(inspector):
    references = inspector.fit(texture_crops(6, seed=12))
    same = inspector.inspect(texture_crops(1, seed=77)[0], references)
    other = inspector.inspect(grass_crops(1)[0], references)
    assert same.reference_fit["fits"] is True and same.warnings == []
    assert other.reference_fit["fits"] is False and other.reference_fit["ratio"] > FIT_LIMIT
    assert other.warnings[0].startswith("the image does not look like the good references")
    assert other.facts().startswith("Warning: the image does not look like")
    # Standardised images hide brightness from the patches; the fit check still sees a much darker exposure.
    dark = (texture_crops(1, seed=77)[0] * 0.45).astype(np.uint8)
    darker = inspector.inspect(dark, references)
    assert darker.reference_fit["brightness"] < -BRIGHTNESS_LIMIT and "spreads darker" in darker.warnings[0]
