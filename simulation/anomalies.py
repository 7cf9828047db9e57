"""Anomaly synthesis: NSA Poisson patches, cut-paste, scratches, spots, stains and missing material.

Every function takes an explicit ``numpy.random.Generator``; the same seed gives identical bytes.
Images are (H, W, 3) uint8 RGB. Per-category bounds live in ``simulation/params.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FAMILIES = ("nsa", "cutpaste", "scratch", "spot", "stain", "missing")
PATCH_FAMILIES = ("nsa", "cutpaste")
CLONE_MODES = {"normal": cv2.NORMAL_CLONE, "mixed": cv2.MIXED_CLONE}
POLARITY = {-1: "dark", 1: "bright"}
PARAMS_PATH = Path(__file__).with_name("params.json")
MAX_ATTEMPTS = 25  # redraws of a whole anomaly before giving up
PLACEMENT_TRIES = 30  # redraws of one patch position before shrinking the patch
SHRINK_STEPS = (1.0, 0.7, 0.5)  # small or ragged foregrounds take smaller patches rather than none
MIN_SIDE = 16  # smaller images cannot hold a patch with a Poisson boundary
FG_MIN_CONTRAST = 12  # Otsu threshold (grey levels) below which no object stands out from the border
FG_FRAC_BOUNDS = (0.01, 0.97)  # an estimated foreground outside these fractions is not trusted
ALPHA_FLOOR = 0.02  # soft edges below this are cut so the changed area stays compact
# Float ranges of SimParams; the size-like ones must be > 0.
SIZE_RANGES = (
    "patch_size",
    "patch_aspect",
    "patch_scale",
    "scratch_length",
    "spot_size",
    "stain_size",
    "missing_size",
)
FLOAT_RANGES = (*SIZE_RANGES, "label_logistic", "contrast", "stain_contrast")


class SimulationError(RuntimeError):
    """No valid anomaly could be drawn within the attempt budget."""


class ParamsError(ValueError):
    """The simulation parameter file is malformed."""


@dataclass(frozen=True)
class SimParams:
    """Per-category sampling bounds; ranges are inclusive (lo, hi) pairs."""

    category: str  # key used in params.json ("generic" when the category is unknown)
    object: bool  # True: defects must land on the estimated foreground
    patch_size: tuple[float, float]  # sqrt(h*w) of an NSA patch, fraction of the shorter side
    patch_aspect: tuple[float, float]  # patch width / height
    patch_count: tuple[int, int]
    patch_scale: tuple[float, float]  # rescale of the source crop before pasting
    clone_modes: tuple[str, ...]  # subset of CLONE_MODES
    label_logistic: tuple[float, float]  # (k, x0) of NSA's soft label
    min_object_frac: float  # objects: least foreground fraction under a patch
    defect_count: tuple[int, int]  # scratches or spots per image
    scratch_length: tuple[float, float]  # fraction of the shorter side
    scratch_width: tuple[int, int]  # pixels
    spot_size: tuple[float, float]  # diameter, fraction of the shorter side
    stain_size: tuple[float, float]
    missing_size: tuple[float, float]
    contrast: tuple[float, float]  # grey-level shift of scratches and spots
    stain_contrast: tuple[float, float]  # largest per-channel shift of stains
    min_change: int  # grey levels a channel must move for a pixel to count as changed
    min_mask_pixels: int  # smaller anomalies are redrawn
    family_weights: dict[str, float]  # not hashable; never used as a dict key


@dataclass
class Simulated:
    """One synthetic anomaly and its labels."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, never empty
    soft_mask: np.ndarray  # (H, W) float32 graded label in [0, 1]; mask implies soft >= 0.5
    family: str
    params: dict[str, Any]  # what was drawn, JSON-serialisable


@dataclass(frozen=True)
class PatchPlacement:
    """Where one source crop goes: destination box (y, x, h, w) and the pixels it may replace."""

    box: tuple[int, int, int, int]
    source_box: tuple[int, int, int, int]  # crop in the source before rescaling
    patch: np.ndarray  # (h, w, 3) uint8, the rescaled crop
    mask: np.ndarray  # (h, w) bool, foreground under the box minus its 1-px rim


@dataclass(frozen=True)
class _Scene:
    """The target image with its foreground, computed once per simulate call."""

    image: np.ndarray  # (H, W, 3) uint8
    fg: np.ndarray  # (H, W) bool
    fg_points: np.ndarray  # (N,) flat indices of fg
    params: SimParams


# ---------------------------------------------------------------- parameters


def _read_params_file(path: Path) -> dict[str, Any]:
    """Parsed params.json with its two required sections."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ParamsError(f"{path}: cannot read simulation parameters ({err})") from err
    if not isinstance(raw.get("generic"), dict) or not isinstance(raw.get("categories"), dict):
        raise ParamsError(f"{path}: needs a 'generic' object and a 'categories' object")
    return raw


def known_categories(path: Path = PARAMS_PATH) -> tuple[str, ...]:
    """Category names that have their own entry in the parameter file."""
    return tuple(sorted(_read_params_file(path)["categories"]))


def load_params(category: str | None, path: Path = PARAMS_PATH) -> SimParams:
    """Parameters for ``category``; None or an unknown name gives the 'generic' defaults."""
    raw = _read_params_file(path)
    key = category if category is not None and category in raw["categories"] else "generic"
    merged = {**raw["generic"], **raw["categories"].get(key, {})}
    return params_from_dict(merged, key, str(path))


def params_from_dict(values: dict[str, Any], category: str, where: str = "params") -> SimParams:
    """Validated SimParams from a plain dict (all fields but category required)."""
    names = {f.name for f in fields(SimParams)} - {"category"}
    missing, extra = names - set(values), set(values) - names
    if missing or extra:
        raise ParamsError(f"{where}[{category}]: missing keys {sorted(missing)}, unknown keys {sorted(extra)}")
    try:
        params = SimParams(category=category, **_converted(values))
    except (TypeError, ValueError) as err:
        raise ParamsError(f"{where}[{category}]: {err}") from err
    _check_params(params, f"{where}[{category}]")
    return params


def _converted(values: dict[str, Any]) -> dict[str, Any]:
    """JSON lists turned into the tuple / number types SimParams declares."""
    out = dict(values)
    for name in FLOAT_RANGES:
        out[name] = _pair(values[name], float, name)
    for name in ("patch_count", "defect_count", "scratch_width"):
        out[name] = _pair(values[name], int, name)
    out["clone_modes"] = tuple(str(m) for m in values["clone_modes"])
    out["family_weights"] = {str(k): float(v) for k, v in dict(values["family_weights"]).items()}
    out["object"], out["min_object_frac"] = bool(values["object"]), float(values["min_object_frac"])
    out["min_change"], out["min_mask_pixels"] = int(values["min_change"]), int(values["min_mask_pixels"])
    return out


def _pair(value: Any, kind: type, name: str) -> tuple[Any, Any]:
    """A (lo, hi) pair with lo <= hi."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"{name} must be a [lo, hi] pair, got {value!r}")
    lo, hi = kind(value[0]), kind(value[1])
    if lo > hi:
        raise ValueError(f"{name} has lo > hi: {value!r}")
    return lo, hi


def _check_params(p: SimParams, where: str) -> None:
    """Raise ParamsError when a value is outside its meaningful range."""
    problems = []
    if set(p.family_weights) != set(FAMILIES) or min(p.family_weights.values()) < 0:
        problems.append(f"family_weights needs non-negative weights for exactly {FAMILIES}")
    elif sum(p.family_weights.values()) <= 0:
        problems.append("family_weights sum to zero")
    if not p.clone_modes or set(p.clone_modes) - set(CLONE_MODES):
        problems.append(f"clone_modes must be a non-empty subset of {tuple(CLONE_MODES)}")
    if min(min(getattr(p, n)) for n in SIZE_RANGES) <= 0:
        problems.append("sizes, aspects and scales must be > 0")
    if p.patch_count[0] < 1 or p.defect_count[0] < 1 or p.scratch_width[0] < 1:
        problems.append("patch_count, defect_count and scratch_width must be >= 1")
    if not 0 <= p.min_object_frac <= 1 or p.min_change < 1 or p.min_mask_pixels < 1:
        problems.append("min_object_frac must be in [0, 1]; min_change and min_mask_pixels >= 1")
    if problems:
        raise ParamsError(f"{where}: " + "; ".join(problems))


# ---------------------------------------------------------------- small helpers


def check_image(image: Any, name: str = "image") -> np.ndarray:
    """The array itself when it is an (H, W, 3) uint8 image of at least MIN_SIDE pixels a side."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"shape {getattr(image, 'shape', None)} dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 RGB array, got {got}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"{name}: sides must be >= {MIN_SIDE} pixels, got {image.shape[:2]}")
    return image


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A log-uniform draw in [lo, hi]; small sizes are as likely per octave as large ones."""
    return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def _int_in(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    """A uniform integer in [lo, hi]."""
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _random_point(scene: _Scene, rng: np.random.Generator) -> tuple[int, int]:
    """A (y, x) pixel drawn uniformly from the foreground."""
    flat = int(scene.fg_points[rng.integers(len(scene.fg_points))])
    return divmod(flat, scene.image.shape[1])


def _max_abs_change(original: np.ndarray, result: np.ndarray) -> np.ndarray:
    """Largest per-channel absolute difference, (H, W) int16."""
    return np.abs(result.astype(np.int16) - original.astype(np.int16)).max(axis=2)


def _smooth_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-variance low-frequency noise (H, W) float32 from a cells x cells grid."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


# ---------------------------------------------------------------- foreground


def border_colour(image: np.ndarray, width: int = 2) -> np.ndarray:
    """Median RGB (3,) float32 of the outer ``width``-pixel ring: the background of an object image."""
    ring = np.concatenate(
        [image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3)]
        + [image[:, :width].reshape(-1, 3), image[:, -width:].reshape(-1, 3)]
    )
    return np.median(ring, axis=0).astype(np.float32)


def foreground_mask(image: np.ndarray, is_object: bool) -> np.ndarray:
    """Estimated foreground (H, W) bool; textures, and objects that do not stand out, give all True."""
    everything = np.ones(image.shape[:2], dtype=bool)
    if not is_object:
        return everything
    smooth = cv2.GaussianBlur(image, (0, 0), 1.5)
    distance = np.abs(smooth.astype(np.float32) - border_colour(smooth)).max(axis=2).astype(np.uint8)
    threshold, fg = cv2.threshold(distance, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    fg = cv2.morphologyEx(cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    fraction = float(fg.mean())
    if threshold < FG_MIN_CONTRAST or not FG_FRAC_BOUNDS[0] <= fraction <= FG_FRAC_BOUNDS[1]:
        return everything
    return fg.astype(bool)


def _scene(image: np.ndarray, params: SimParams) -> _Scene:
    """Target image bundled with its foreground."""
    fg = foreground_mask(image, params.object)
    return _Scene(image=image, fg=fg, fg_points=np.flatnonzero(fg), params=params)


# ---------------------------------------------------------------- NSA and cut-paste


def _patch_shape(image_shape: tuple[int, ...], params: SimParams, rng: np.random.Generator) -> tuple[int, int]:
    """Destination (h, w) of one patch, clipped so it fits with a margin."""
    height, width = image_shape[:2]
    side = _log_uniform(rng, params.patch_size) * min(height, width)
    aspect = _log_uniform(rng, params.patch_aspect)
    h = int(np.clip(round(side / math.sqrt(aspect)), 8, height - 2))
    w = int(np.clip(round(side * math.sqrt(aspect)), 8, width - 2))
    return h, w


def _box_on_foreground(
    fg: np.ndarray, fg_points: np.ndarray, size: tuple[int, int], min_frac: float, rng: np.random.Generator
) -> tuple[int, int] | None:
    """Top-left (y, x) of a box of ``size`` centred on a foreground pixel and covering enough of it."""
    (height, width), (h, w) = fg.shape, size
    for _ in range(PLACEMENT_TRIES):
        cy, cx = divmod(int(fg_points[rng.integers(len(fg_points))]), width)
        y, x = int(np.clip(cy - h // 2, 0, height - h)), int(np.clip(cx - w // 2, 0, width - w))
        if fg[y : y + h, x : x + w].mean() >= min_frac:
            return y, x
    return None


def sample_placement(
    fg: np.ndarray, source: np.ndarray, source_fg: np.ndarray, params: SimParams, rng: np.random.Generator
) -> PatchPlacement | None:
    """One NSA patch: a ``source`` crop on its foreground, rescaled, placed on the target foreground ``fg``.

    A patch that finds no box with enough foreground is shrunk (SHRINK_STEPS) before giving up with None.
    """
    h, w = _patch_shape(fg.shape, params, rng)
    scale = _log_uniform(rng, params.patch_scale)
    points, source_points = np.flatnonzero(fg), np.flatnonzero(source_fg)
    for shrink in SHRINK_STEPS:
        size = (max(8, round(h * shrink)), max(8, round(w * shrink)))
        src_h = int(np.clip(round(size[0] / scale), 4, source.shape[0]))
        src_size = (src_h, int(np.clip(round(size[1] / scale), 4, source.shape[1])))
        src_at = _box_on_foreground(source_fg, source_points, src_size, params.min_object_frac, rng)
        dst_at = _box_on_foreground(fg, points, size, params.min_object_frac, rng)
        if src_at is not None and dst_at is not None:
            return _placement(fg, source, (*dst_at, *size), (*src_at, *src_size))
    return None


def _placement(
    fg: np.ndarray, source: np.ndarray, box: tuple[int, int, int, int], source_box: tuple[int, int, int, int]
) -> PatchPlacement | None:
    """The rescaled crop and paste mask for chosen boxes; None when the mask is too small to blend."""
    (y, x, h, w), (sy, sx, sh, sw) = box, source_box
    patch = cv2.resize(source[sy : sy + sh, sx : sx + sw], (w, h), interpolation=cv2.INTER_LINEAR)
    mask = fg[y : y + h, x : x + w].copy()
    # Poisson editing fixes the mask boundary to the target, so the box rim can never change.
    mask[0, :], mask[-1, :], mask[:, 0], mask[:, -1] = False, False, False, False
    if mask.sum() < 16:
        return None
    return PatchPlacement(box, source_box, np.ascontiguousarray(patch), mask)


def paste_patch(image: np.ndarray, placement: PatchPlacement, mode: str) -> np.ndarray:
    """``image`` with the patch pasted inside its mask: 'normal' / 'mixed' Poisson blending or 'none'."""
    if mode != "none" and mode not in CLONE_MODES:
        raise ValueError(f"mode: unknown {mode!r}; known: none, {', '.join(CLONE_MODES)}")
    y, x, h, w = placement.box
    out = image.copy()
    target = out[y : y + h, x : x + w]
    if mode == "none":
        target[placement.mask] = placement.patch[placement.mask]
        return out
    ys, xs = np.nonzero(placement.mask)
    by, bx, bh, bw = int(ys.min()), int(xs.min()), int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    # OpenCV centres the mask's bounding rect on this point; a fresh mask array because cv2 5 writes into it.
    centre = (x + bx + bw // 2, y + by + bh // 2)
    mask8 = placement.mask.astype(np.uint8) * 255
    cloned = cv2.seamlessClone(placement.patch, np.ascontiguousarray(image), mask8, centre, CLONE_MODES[mode])
    # The Poisson solve spans the bounding rect; keep only the mask so pixels off the foreground stay exact.
    target[placement.mask] = cloned[y : y + h, x : x + w][placement.mask]
    return out


def intensity_label(
    original: np.ndarray, result: np.ndarray, region: np.ndarray, logistic: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """NSA label in ``region``: soft (H, W) float32 = logistic of the smoothed change; binary = soft > 0.5."""
    change = np.abs(result.astype(np.int16) - original.astype(np.int16)).mean(axis=2)
    smoothed = cv2.medianBlur(np.rint(change).astype(np.uint8), 5).astype(np.float32)
    k, x0 = logistic
    soft = 1.0 / (1.0 + np.exp(-k * (smoothed - x0)))
    soft = np.where(region & (smoothed > 0) & (change > 0), soft, 0.0).astype(np.float32)
    return soft, soft > 0.5


def _patch_family(scene: _Scene, source: np.ndarray | None, blend: bool, rng: np.random.Generator) -> Simulated | None:
    """NSA (blend=True) or plain cut-paste: one or more source patches on the target foreground."""
    params, image = scene.params, scene.image
    source = image if source is None else source
    source_fg = foreground_mask(source, params.object)
    out, region, patches = image.copy(), np.zeros(image.shape[:2], dtype=bool), []
    for _ in range(_int_in(rng, params.patch_count)):
        # Drawn for both families so that equal seeds give equal placements.
        drawn = params.clone_modes[int(rng.integers(len(params.clone_modes)))]
        mode = drawn if blend else "none"
        placement = sample_placement(scene.fg, source, source_fg, params, rng)
        if placement is None:
            continue
        try:
            out = paste_patch(out, placement, mode)
        except cv2.error:  # OpenCV rejects some degenerate masks; skip that patch
            continue
        y, x, h, w = placement.box
        region[y : y + h, x : x + w] |= placement.mask
        patches.append({"box": list(placement.box), "source_box": list(placement.source_box), "mode": mode})
    if not patches:
        return None
    soft, mask = intensity_label(image, out, region, params.label_logistic)
    family = "nsa" if blend else "cutpaste"
    return Simulated(out, mask, soft, family, {"patches": patches, "self_source": source is image})


# ---------------------------------------------------------------- local defects


def _shifted(image: np.ndarray, alpha: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``image + alpha * delta`` rounded and clipped; exact where alpha == 0."""
    shifted = image.astype(np.float32) + alpha[..., None] * delta.astype(np.float32)
    return np.clip(np.rint(shifted), 0, 255).astype(np.uint8)


def _polarity(image: np.ndarray, alpha: np.ndarray, contrast: float, rng: np.random.Generator) -> int | None:
    """-1 (darker) or +1 (brighter) at random, flipped when the pixels under alpha lack the headroom."""
    covered = alpha >= 0.5
    if not covered.any():
        return None
    level = float(image[covered].mean())
    sign = -1 if rng.random() < 0.5 else 1
    if sign < 0 and level < contrast / 2:
        return 1
    if sign > 0 and level > 255 - contrast / 2:
        return -1
    return sign


def _local_result(scene: _Scene, out: np.ndarray, alpha: np.ndarray, family: str, info: dict) -> Simulated:
    """Local-defect labels: soft = coverage where pixels changed; mask = soft >= 0.5 with a visible change."""
    change = _max_abs_change(scene.image, out)
    soft = np.where(change > 0, np.clip(alpha, 0.0, 1.0), 0.0).astype(np.float32)
    mask = (soft >= 0.5) & (change >= scene.params.min_change)
    return Simulated(out, mask, soft, family, info)


def _curve_points(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(N, 2) float x, y points of a smooth scratch (cubic Bezier) or a jagged crack (random walk)."""
    y0, x0 = _random_point(scene, rng)
    length = _log_uniform(rng, scene.params.scratch_length) * min(scene.image.shape[:2])
    angle = rng.uniform(0, 2 * math.pi)
    if rng.random() < 0.5:
        along = np.array([math.cos(angle), math.sin(angle)])
        normal = np.array([-along[1], along[0]])
        bend = rng.normal(0, 0.25 * length, size=2)
        ctrl = [np.zeros(2), along * length / 3 + normal * bend[0], along * 2 * length / 3 + normal * bend[1]]
        ctrl.append(along * length)
        t = np.linspace(0, 1, 48)[:, None]
        curve = (1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1] + 3 * (1 - t) * t**2 * ctrl[2] + t**3 * ctrl[3]
        return curve + [x0, y0], "scratch"
    steps = int(rng.integers(10, 25))
    headings = angle + np.cumsum(rng.normal(0, 0.45, size=steps))
    moves = np.stack([np.cos(headings), np.sin(headings)], axis=1) * (length / steps)
    return np.vstack([[0.0, 0.0], np.cumsum(moves, axis=0)]) + [x0, y0], "crack"


def _polyline_alpha(shape: tuple[int, int], points: np.ndarray, width: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 of a polyline drawn ``width`` pixels wide."""
    canvas = np.zeros(shape, dtype=np.uint8)
    fixed = np.rint(points * 16).astype(np.int32).reshape(-1, 1, 2)  # 4 fractional bits
    cv2.polylines(canvas, [fixed], False, 255, thickness=width, lineType=cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _scratch(scene: _Scene, rng: np.random.Generator) -> Simulated | None:
    """Thin scratches / cracks, 1-4 px wide, all darker or all brighter than the surface."""
    params, shape = scene.params, scene.image.shape[:2]
    alpha, curves = np.zeros(shape, dtype=np.float32), []
    for _ in range(_int_in(rng, params.defect_count)):
        points, kind = _curve_points(scene, rng)
        width = _int_in(rng, params.scratch_width)
        alpha = np.maximum(alpha, _polyline_alpha(shape, points, width))
        curves.append({"kind": kind, "width": width, "start_xy": [round(float(v), 1) for v in points[0]]})
    return _grey_shift(scene, alpha, rng, "scratch", {"curves": curves})


def _grey_shift(
    scene: _Scene, alpha: np.ndarray, rng: np.random.Generator, family: str, info: dict
) -> Simulated | None:
    """Darken or brighten the image by one contrast under `alpha` (on the foreground); None if it cannot show."""
    alpha = alpha * scene.fg
    contrast = float(rng.uniform(*scene.params.contrast))
    sign = _polarity(scene.image, alpha, contrast, rng)
    if sign is None:
        return None
    out = _shifted(scene.image, alpha, np.full(3, sign * contrast))
    return _local_result(scene, out, alpha, family, info | {"polarity": POLARITY[sign], "contrast": contrast})


def _ellipse_alpha(
    shape: tuple[int, int], centre: tuple[int, int], axes: tuple[float, float], angle: float, edge: float
) -> np.ndarray:
    """Filled ellipse (H, W) float32 with a Gaussian soft edge of ``edge`` px, tails below ALPHA_FLOOR cut."""
    canvas = np.zeros(shape, dtype=np.uint8)
    axes_px = (max(1, round(axes[0])), max(1, round(axes[1])))
    cv2.ellipse(canvas, (centre[1], centre[0]), axes_px, angle, 0, 360, 255, thickness=-1, lineType=cv2.LINE_AA)
    alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), edge)
    alpha[alpha < ALPHA_FLOOR] = 0.0
    return alpha


def _spot(scene: _Scene, rng: np.random.Generator) -> Simulated | None:
    """Compact elliptical spots or holes with soft edges, all darker or all brighter."""
    params, shape = scene.params, scene.image.shape[:2]
    alpha, spots = np.zeros(shape, dtype=np.float32), []
    for _ in range(_int_in(rng, params.defect_count)):
        centre = _random_point(scene, rng)
        radius = max(1.5, _log_uniform(rng, params.spot_size) * min(shape) / 2)
        axes = (radius, radius * float(rng.uniform(0.5, 1.0)))
        angle, edge = float(rng.uniform(0, 180)), float(rng.uniform(0.5, 1.5))
        alpha = np.maximum(alpha, _ellipse_alpha(shape, centre, axes, angle, edge))
        spots.append({"centre": list(centre), "radius": round(radius, 2), "edge": round(edge, 2)})
    return _grey_shift(scene, alpha, rng, "spot", {"spots": spots})


def _blob(shape: tuple[int, int], centre: tuple[int, int], diameter: float, rng: np.random.Generator) -> np.ndarray:
    """Irregular blob (H, W) bool: an ellipse whose outline is pushed around by low-frequency noise."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    a, b = diameter / 2, diameter / 2 * rng.uniform(0.5, 1.0)
    dy, dx = yy - centre[0], xx - centre[1]
    u, v = dx * math.cos(angle) + dy * math.sin(angle), -dx * math.sin(angle) + dy * math.cos(angle)
    radial = (u / a) ** 2 + (v / b) ** 2
    wobble = 0.3 * _smooth_noise(shape, int(rng.integers(4, 9)), rng)
    region = radial + wobble < 1.0
    region[centre] = True
    return region


def _stain(scene: _Scene, rng: np.random.Generator) -> Simulated | None:
    """A smooth discolouration: a soft blob shifting each channel the same way by different amounts."""
    params, shape = scene.params, scene.image.shape[:2]
    centre = _random_point(scene, rng)
    diameter = _log_uniform(rng, params.stain_size) * min(shape)
    region = _blob(shape, centre, diameter, rng).astype(np.float32)
    edge = float(rng.uniform(0.8, 1.5))
    texture = 0.8 + 0.2 * np.clip(_smooth_noise(shape, 12, rng), -1, 1)  # blotchy but >= 0.6: labelled inside
    alpha = cv2.GaussianBlur(region, (0, 0), edge) * texture
    alpha[alpha < ALPHA_FLOOR] = 0.0
    alpha *= scene.fg
    contrast = float(rng.uniform(*params.stain_contrast))
    sign = _polarity(scene.image, alpha, contrast, rng)
    if sign is None:
        return None
    tint = rng.uniform(0.4, 1.0, size=3)
    delta = sign * contrast * tint / tint.max()
    out = _shifted(scene.image, alpha, delta)
    info = {"centre": list(centre), "diameter": round(diameter, 2), "polarity": POLARITY[sign]}
    info["delta_rgb"] = [round(float(d), 2) for d in delta]
    return _local_result(scene, out, alpha, "stain", info)


def _edge_point(scene: _Scene, rng: np.random.Generator) -> tuple[int, int]:
    """A (y, x) pixel on the foreground's outline, where chipped-off material is visible."""
    inner = cv2.erode(scene.fg.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    outline = np.flatnonzero(scene.fg & ~inner)
    flat = int(outline[rng.integers(len(outline))]) if len(outline) else int(scene.fg_points[0])
    return divmod(flat, scene.image.shape[1])


def _missing(scene: _Scene, rng: np.random.Generator) -> Simulated | None:
    """Missing material: a blob filled from its surroundings (textures) or with the background (objects)."""
    params, image, shape = scene.params, scene.image, scene.image.shape[:2]
    chip = not scene.fg.all()
    centre = _edge_point(scene, rng) if chip else _random_point(scene, rng)
    diameter = _log_uniform(rng, params.missing_size) * min(shape)
    region = _blob(shape, centre, diameter, rng) & scene.fg
    if chip:
        noise = rng.normal(0, 2.0, size=(int(region.sum()), 3)).astype(np.float32)  # sensor grain
        out = image.copy()
        out[region] = np.clip(np.rint(border_colour(image) + noise), 0, 255).astype(np.uint8)
    else:
        out = cv2.inpaint(image, region.astype(np.uint8), 5, cv2.INPAINT_TELEA)
        out = np.where(region[..., None], out, image)  # inpaint must not touch anything else
    change = _max_abs_change(image, out)
    if not region.any() or change[region].mean() < params.min_change:
        return None
    # The whole replaced region is the defect, even where the fill happens to match the old pixels.
    info = {
        "centre": list(centre),
        "diameter": round(diameter, 2),
        "fill": "background" if chip else "inpaint",
    }
    return Simulated(out, region, region.astype(np.float32), "missing", info)


# ---------------------------------------------------------------- entry points


def simulate(
    image: np.ndarray, source: np.ndarray | None, family: str, params: SimParams, rng: np.random.Generator
) -> Simulated:
    """One ``family`` anomaly on ``image``; ``source`` feeds NSA / cut-paste patches (None: the image itself).

    Redraws up to MAX_ATTEMPTS times until the binary mask has ``params.min_mask_pixels`` pixels.
    """
    check_image(image)
    if source is not None:
        check_image(source, "source")
    if family not in FAMILIES:
        raise ValueError(f"family: unknown {family!r}; known: {', '.join(FAMILIES)}")
    scene = _scene(image, params)
    for attempt in range(MAX_ATTEMPTS):
        result = _draw(scene, source, family, rng)
        if result is not None and int(result.mask.sum()) >= params.min_mask_pixels:
            result.params |= {"category": params.category, "attempt": attempt}
            return result
    raise SimulationError(
        f"no {family} anomaly with >= {params.min_mask_pixels} changed pixels after {MAX_ATTEMPTS} attempts "
        f"on a {image.shape[0]}x{image.shape[1]} image "
        f"(foreground {scene.fg.mean():.1%}, category {params.category})"
    )


def _draw(scene: _Scene, source: np.ndarray | None, family: str, rng: np.random.Generator) -> Simulated | None:
    """One attempt at ``family``; None when the draw produced nothing usable."""
    if family in PATCH_FAMILIES:
        return _patch_family(scene, source, family == "nsa", rng)
    generators = {"scratch": _scratch, "spot": _spot, "stain": _stain, "missing": _missing}
    return generators[family](scene, rng)


def simulate_random(
    image: np.ndarray, sources: Sequence[np.ndarray], params: SimParams, rng: np.random.Generator
) -> Simulated:
    """An anomaly of a family drawn by ``params.family_weights``; patches from a random ``sources`` entry.

    With no sources, NSA / cut-paste take their patches from ``image`` itself. A family that cannot
    produce a visible anomaly on this image (e.g. missing material on a flat black crop) is replaced by
    a redraw among the remaining families; ``params["failed_families"]`` lists those given up.
    """
    check_image(image)
    remaining, failed = list(FAMILIES), []
    while remaining:
        weights = np.array([params.family_weights[f] for f in remaining], dtype=np.float64)
        if weights.sum() <= 0:
            break
        family = remaining.pop(int(rng.choice(len(remaining), p=weights / weights.sum())))
        source = sources[int(rng.integers(len(sources)))] if len(sources) and family in PATCH_FAMILIES else None
        try:
            result = simulate(image, source, family, params, rng)
        except SimulationError:
            failed.append(family)
            continue
        result.params["failed_families"] = failed
        return result
    raise SimulationError(f"no family with a positive weight produced an anomaly (tried {', '.join(failed)})")
