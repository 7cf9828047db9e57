"""Tests for simulation.anomalies on small images built from scikit-image's bundled data."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from simulation.anomalies import (
    FAMILIES,
    ParamsError,
    PatchPlacement,
    SimParams,
    SimulationError,
    foreground_mask,
    intensity_label,
    known_categories,
    load_params,
    paste_patch,
    simulate,
    simulate_random,
)

LOCAL_FAMILIES = ("scratch", "spot", "stain", "missing")
SEEDS = range(6)
MVTEC = "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor"
MVTEC += " wood zipper"
VISA = "candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum"


def _rgb128(grey: np.ndarray) -> np.ndarray:
    """(128, 128, 3) uint8 from a grey image, mapped into [30, 225] so shifts never clip to nothing."""
    small = cv2.resize(grey, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)
    lifted = np.rint(30 + small * (195 / 255)).astype(np.uint8)
    return np.repeat(lifted[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def textures() -> dict[str, np.ndarray]:
    return {name: _rgb128(getattr(skimage.data, name)()) for name in ("brick", "grass", "gravel", "camera", "coins")}


@pytest.fixture(scope="module")
def disk_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright gravel disk (radius 40) on black, a brick disk as source, and the true disk mask."""
    yy, xx = np.mgrid[:128, :128]
    disk = (yy - 64) ** 2 + (xx - 64) ** 2 <= 40**2
    target, source = np.zeros((128, 128, 3), np.uint8), np.zeros((128, 128, 3), np.uint8)
    target[disk] = (120 + _rgb128(skimage.data.gravel()).astype(np.int32) // 2)[disk]
    source[disk] = (120 + _rgb128(skimage.data.brick()).astype(np.int32) // 2)[disk]
    return target, source, disk


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > 0


def _dilated(mask: np.ndarray, radius: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _only(params: SimParams, family: str) -> SimParams:
    return dataclasses.replace(params, family_weights={f: float(f == family) for f in FAMILIES})


# ---------------------------------------------------------------- parameters


def test_params_cover_mvtec_and_visa_and_unknown_falls_back_to_generic() -> None:
    assert set(known_categories()) == set(MVTEC.split()) | set(VISA.split())
    bottle = load_params("bottle")
    assert bottle.object and bottle.label_logistic == (0.0833, 24.0) and bottle.min_object_frac == 0.7
    assert load_params("carpet").object is False and load_params("carpet").patch_count == (1, 4)
    assert load_params("screw").scratch_width == (1, 2)
    generic = load_params(None)
    assert generic.category == "generic" and generic.scratch_width == (1, 4)
    assert load_params("no_such_product") == generic


def test_bad_params_file_names_file_and_problem(tmp_path: Path) -> None:
    raw = json.loads((Path(__file__).parents[1] / "simulation" / "params.json").read_text())
    raw["categories"] = {"odd": {"patch_size": [0.5, 0.1]}, "typo": {"patch_sise": [0.1, 0.2]}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ParamsError, match=r"p\.json\[odd\].*patch_size has lo > hi"):
        load_params("odd", path)
    with pytest.raises(ParamsError, match=r"unknown keys \['patch_sise'\]"):
        load_params("typo", path)
    path.write_text("{not json")
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(None, path)


# ---------------------------------------------------------------- inputs and errors


def test_bad_inputs_raise_clear_errors(textures: dict[str, np.ndarray]) -> None:
    params, rng = load_params(None), np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"image: expected an \(H, W, 3\) uint8"):
        simulate(textures["brick"][..., 0], None, "spot", params, rng)
    with pytest.raises(ValueError, match="source: expected"):
        simulate(textures["brick"], textures["grass"].astype(np.float32), "nsa", params, rng)
    with pytest.raises(ValueError, match="unknown 'dent'; known: nsa, cutpaste"):
        simulate(textures["brick"], None, "dent", params, rng)
    impossible = dataclasses.replace(params, min_mask_pixels=10**6)
    with pytest.raises(SimulationError, match="no spot anomaly with >= 1000000 changed pixels after 25 attempts"):
        simulate(textures["brick"], None, "spot", impossible, rng)


# ---------------------------------------------------------------- determinism and label invariants


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_bytes(family: str, textures: dict[str, np.ndarray]) -> None:
    params = load_params(None)
    runs = [
        simulate(textures["brick"], textures["gravel"], family, params, np.random.default_rng(s)) for s in (7, 7, 8)
    ]
    assert runs[0].image.tobytes() == runs[1].image.tobytes()
    assert runs[0].mask.tobytes() == runs[1].mask.tobytes()
    assert runs[0].soft_mask.tobytes() == runs[1].soft_mask.tobytes()
    assert json.dumps(runs[0].params) == json.dumps(runs[1].params)
    assert runs[0].image.tobytes() != runs[2].image.tobytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_are_non_empty_typed_and_consistent(family: str, textures: dict[str, np.ndarray]) -> None:
    params = load_params(None)
    for seed, name in zip(SEEDS, textures, strict=False):
        image = textures[name]
        result = simulate(image, textures["grass"], family, params, np.random.default_rng(seed))
        assert result.family == family and result.image.shape == image.shape and result.image.dtype == np.uint8
        assert result.mask.dtype == bool and result.mask.shape == image.shape[:2]
        assert result.soft_mask.dtype == np.float32 and 0 <= result.soft_mask.min() <= result.soft_mask.max() <= 1
        assert result.mask.sum() >= params.min_mask_pixels
        assert (result.soft_mask[result.mask] >= 0.5).all()
        # Missing material labels the whole replaced blob, even where the fill matches the old pixels.
        assert (_changed(image, result.image)[result.mask]).mean() > (0.6 if family == "missing" else 0.9)


@pytest.mark.parametrize("family", LOCAL_FAMILIES)
def test_local_families_leave_image_unchanged_outside_dilated_mask(
    family: str, textures: dict[str, np.ndarray]
) -> None:
    params = load_params(None)
    for seed in SEEDS:
        image = textures[("brick", "gravel", "coins")[seed % 3]]
        result = simulate(image, None, family, params, np.random.default_rng(seed))
        changed = _changed(image, result.image)
        # Soft edges reach at most ~2 sigma (sigma <= 1.5 px) past the 0.5 contour; 5 px is a safe bound.
        assert not (changed & ~_dilated(result.mask, 5)).any()
        assert not (changed & (result.soft_mask == 0)).any()


@pytest.mark.parametrize("family", ("nsa", "cutpaste"))
def test_patch_families_change_only_inside_their_boxes(family: str, textures: dict[str, np.ndarray]) -> None:
    params = load_params(None)
    for seed in SEEDS:
        image = textures["gravel"]
        result = simulate(image, textures["brick"], family, params, np.random.default_rng(seed))
        boxes = np.zeros(image.shape[:2], dtype=bool)
        for patch in result.params["patches"]:
            y, x, h, w = patch["box"]
            boxes[y + 1 : y + h - 1, x + 1 : x + w - 1] = True  # the 1-px rim is the Poisson boundary
        assert not (_changed(image, result.image) & ~boxes).any()
        assert not (result.mask & ~boxes).any()
        assert result.params["self_source"] is False


def test_nsa_and_cutpaste_share_placements_for_a_seed(textures: dict[str, np.ndarray]) -> None:
    params = load_params(None)
    for seed in SEEDS:
        runs = [
            simulate(textures["grass"], textures["brick"], f, params, np.random.default_rng(seed))
            for f in ("nsa", "cutpaste")
        ]
        if runs[0].params["attempt"] == runs[1].params["attempt"] == 0:
            boxes = [[p["box"] for p in r.params["patches"]] for r in runs]
            assert boxes[0] == boxes[1]


# ---------------------------------------------------------------- objects


def test_foreground_estimate_matches_a_disk_on_black(disk_scene: tuple[np.ndarray, ...]) -> None:
    target, _, disk = disk_scene
    fg = foreground_mask(target, is_object=True)
    assert (fg & disk).sum() / (fg | disk).sum() > 0.97
    assert foreground_mask(target, is_object=False).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_object_defects_stay_on_the_foreground(family: str, disk_scene: tuple[np.ndarray, ...]) -> None:
    target, source, disk = disk_scene
    params = load_params("hazelnut")
    assert params.object
    near_disk = _dilated(disk, 2)  # the estimate's edge may sit a pixel or two off the true edge
    for seed in SEEDS:
        result = simulate(target, source, family, params, np.random.default_rng(seed))
        assert not (result.mask & ~near_disk).any()
        assert not (_changed(target, result.image) & ~near_disk).any()


def test_missing_material_on_an_object_shows_the_background(disk_scene: tuple[np.ndarray, ...]) -> None:
    target, _, disk = disk_scene
    for seed in SEEDS:
        result = simulate(target, None, "missing", load_params("hazelnut"), np.random.default_rng(seed))
        assert result.params["fill"] == "background"
        # Disk pixels are >= 135; the background is 0 plus noise of sigma 2.
        assert target[result.mask].min() >= 135 and result.image[result.mask].mean() < 4


def test_missing_material_on_a_texture_is_filled_from_its_surroundings(
    textures: dict[str, np.ndarray],
) -> None:
    image = textures["brick"]
    for seed in SEEDS:
        result = simulate(image, None, "missing", load_params("carpet"), np.random.default_rng(seed))
        assert result.params["fill"] == "inpaint"
        ring = _dilated(result.mask, 6) & ~result.mask
        fill = result.image[result.mask]
        assert image[ring].min() <= fill.min() and fill.max() <= image[ring].max()


# ---------------------------------------------------------------- contrast


@pytest.mark.parametrize("family", ("scratch", "spot", "stain"))
def test_defects_have_the_sign_of_contrast_they_report(family: str, textures: dict[str, np.ndarray]) -> None:
    params, seen = load_params(None), set()
    for seed in range(12):
        image = textures[("brick", "grass", "camera")[seed % 3]]
        result = simulate(image, None, family, params, np.random.default_rng(seed))
        diff = result.image.astype(np.int16) - image.astype(np.int16)  # (H, W, 3)
        sign = -1 if result.params["polarity"] == "dark" else 1
        seen.add(sign)
        assert (sign * diff >= 0).all()
        assert (sign * diff[result.mask]).max(axis=1).min() >= params.min_change
    assert seen == {-1, 1}


def test_scratches_are_thin(textures: dict[str, np.ndarray]) -> None:
    params = dataclasses.replace(load_params(None), defect_count=(1, 1))
    for seed in range(12):
        result = simulate(textures["grass"], None, "scratch", params, np.random.default_rng(seed))
        # Eroding a <= 4-px line (+1 px of anti-aliasing each side) with a 9x9 disk leaves nothing.
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
        assert cv2.erode(result.mask.astype(np.uint8), kernel).sum() == 0
        assert all(1 <= c["width"] <= 4 for c in result.params["curves"])


# ---------------------------------------------------------------- NSA building blocks


def test_intensity_label_matches_hand_computation() -> None:
    original = np.zeros((32, 32, 3), np.uint8)
    result = original.copy()
    result[10:22, 10:22] = 30
    block = np.zeros((32, 32), bool)
    block[10:22, 10:22] = True
    soft, mask = intensity_label(original, result, block, (0.5, 20.0))
    assert soft[15, 15] == pytest.approx(1 / (1 + math.exp(-0.5 * 10)), abs=1e-6)
    # The 5x5 median drops three pixels at each corner of the 12x12 block: 144 - 12.
    assert mask.sum() == 132 and not mask[10, 10] and not mask[10, 11] and mask[11, 11]
    assert soft[~block].max() == 0


def test_poisson_blending_removes_a_constant_offset_that_cut_paste_keeps() -> None:
    image = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[1:-1, 1:-1] = True
    placement = PatchPlacement((20, 22, 20, 20), (0, 0, 20, 20), np.full((20, 20, 3), 200, np.uint8), mask)
    # OpenCV truncates the float solution, so a flat result may read 99.
    assert np.abs(paste_patch(image, placement, "normal").astype(int) - 100).max() <= 1
    pasted = paste_patch(image, placement, "none")
    assert (pasted[21:39, 23:41] == 200).all() and int(pasted.sum()) == 100 * 64 * 64 * 3 + 100 * 18 * 18 * 3


# ---------------------------------------------------------------- random family choice


def test_simulate_random_follows_the_family_weights(textures: dict[str, np.ndarray]) -> None:
    params = load_params(None)
    for family in FAMILIES:
        result = simulate_random(
            textures["coins"], [textures["brick"]], _only(params, family), np.random.default_rng(1)
        )
        assert result.family == family
    nsa_only = _only(params, "nsa")
    assert simulate_random(textures["coins"], [], nsa_only, np.random.default_rng(2)).params["self_source"]
    with_source = simulate_random(textures["coins"], [textures["brick"]], nsa_only, np.random.default_rng(2))
    assert with_source.params["self_source"] is False


def test_simulate_random_redraws_a_family_that_cannot_mark_the_image() -> None:
    flat = np.full((64, 64, 3), 128, np.uint8)  # inpainting a flat surface changes nothing
    weights = {f: 0.0 for f in FAMILIES} | {"missing": 1.0, "spot": 1e-9}
    params = dataclasses.replace(load_params(None), family_weights=weights)
    result = simulate_random(flat, [], params, np.random.default_rng(0))
    assert result.family == "spot" and result.params["failed_families"] == ["missing"]
    with pytest.raises(SimulationError, match=r"no family .* \(tried missing\)"):
        simulate_random(flat, [], _only(params, "missing"), np.random.default_rng(0))


def test_normals_command_writes_seeded_crops_of_the_chosen_pictures(tmp_path: Path) -> None:
    from simulation.normals import main as normals_main

    assert normals_main(["--pictures", "validation", "--n", "4", "--size", "32", "--out", str(tmp_path / "a")]) == 0
    assert normals_main(["--pictures", "validation", "--n", "4", "--size", "32", "--out", str(tmp_path / "b")]) == 0
    written = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in written] == ["000.png", "001.png", "002.png", "003.png"]
    first = [cv2.imread(str(p)) for p in written]
    assert all(image.shape == (32, 32, 3) for image in first)
    assert all(np.array_equal(a, cv2.imread(str(tmp_path / "b" / p.name))) for a, p in zip(first, written, strict=True))
    assert not np.array_equal(first[0], first[1])  # crops of different pictures
    with pytest.raises(SystemExit):
        normals_main(["--n", "0", "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def _thumbnail(name: str) -> np.ndarray:
    from simulation.normals import picture

    grey = cv2.resize(cv2.cvtColor(picture(name), cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
    values = grey.astype(np.float64).ravel()
    return (values - values.mean()) / (values.std() + 1e-9)


def test_training_pictures_share_no_image_with_held_out_ones() -> None:
    from simulation.normals import TEST_PICTURES, TRAIN_PICTURES, VALIDATION_PICTURES

    assert float(np.mean(_thumbnail("cat") * _thumbnail("chelsea"))) > 0.99  # an alias is caught by this measure
    held_out = set(VALIDATION_PICTURES) | set(TEST_PICTURES)
    assert not held_out & set(TRAIN_PICTURES)
    thumbnails = {name: _thumbnail(name) for name in (*TRAIN_PICTURES, *held_out)}
    correlations = [float(np.mean(thumbnails[a] * thumbnails[b])) for a in TRAIN_PICTURES for b in held_out]
    assert max(correlations) < 0.9
