"""k-shot benchmark runner: encode each test image once, then score every (k, seed) from that cache.

Protocol (DESIGN.md "Evaluation protocol"): full images, k references drawn with `draw_shots` per seed,
thresholds from the references only (the Inspector's calibration), nothing normalised over the test set.
Each finished (category, k, seed) is written atomically under <out>/cache/ and reused by a re-run of the
same configuration.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from anomalygpt.calibration import Calibration
from anomalygpt.config import Preset, to_dict
from anomalygpt.inspection import Inspector
from anomalygpt.io import load_image, write_json_atomic
from anomalygpt.memory import embed_patches, fuse_maps, memory_inputs, top_mean
from anomalygpt.mutual import batch_calibration
from anomalygpt.regions import Region
from anomalygpt.verdict import decide
from eval.datasets import CategorySplit, Sample, draw_shots, load_mask
from eval.metrics import PixelMetrics, image_metrics, verdict_metrics

EVAL_PROTOCOL = 1  # bump whenever scoring changes, so cache files of the old protocol are refused
ENCODE_BATCH = 16  # images decoded and encoded at once
SCORE_BATCH = 16  # cached images turned into maps at once: 16 x 1024 x 1024 float32 maps is 64 MB
CACHE_DIR = "cache"
CONFIG_FILE = "config.json"  # in CACHE_DIR: the fingerprint every cached setting belongs to
INSPECTOR = "inspector"  # the few-shot method; every other --method is a baseline (anomalygpt.detector)

Metrics = dict[str, float | int | None]


class EvalError(ValueError):
    """The benchmark cannot run as asked; the message is one line naming the argument, file or category."""


@dataclass(frozen=True)
class EvalConfig:
    dataset: str
    root: Path | None  # None for ELPV, which reads its installed package
    categories: tuple[str, ...]
    shots: tuple[int, ...]  # k values, ascending
    seeds: tuple[int, ...]
    preset: Preset
    out: Path
    held_out: bool = False  # also score the split's held-out samples (ELPV's uncertain p = 1/3 cells)
    methods: tuple[str, ...] = (INSPECTOR,)  # any baseline: every method trains on the same full-shot split
    test_fraction: float = 0.3  # with baselines: share of the good images held out for testing (ELPV, folders)
    half: str = "all"  # ELPV: "dev" (odd-numbered cells), "test" (even-numbered) or "all"
    zero_shot: str = ""  # with shots (0,): "text" the decoder alone, "batch" the test images against each other

    @property
    def full_shot(self) -> bool:
        return self.methods != (INSPECTOR,)


@dataclass
class PatchCache:
    """Raw backbone patches of every scored image of one category, encoded once."""

    index: dict[Path, int]  # image path -> row in every stage tensor
    stages: list[torch.Tensor]  # per stage (N, C, h, w) float16
    image_size: tuple[int, int]  # (H, W) shared by every image of the category
    encode_ms_per_image: float  # decode + backbone, batched


@dataclass
class SettingResult:
    """Everything one (category, k, seed) produced; what the cache file holds."""

    category: str
    k: int
    seed: int
    metrics: Metrics
    references: list[str]
    paths: list[str]  # scored test images, in draw order
    labels: list[int]  # 0 good, 1 defective
    defects: list[str]
    scores: list[float]
    calibration: dict[str, Any]
    held_out_scores: list[float] = field(default_factory=list)  # ELPV's uncertain p = 1/3 cells
    method: str = INSPECTOR  # a baseline's name: trained on every good image not held out (k = how many)

    @property
    def label(self) -> str:
        """The report row this result belongs to: 'k=4' for the Inspector, the method's name for a baseline."""
        return f"k={self.k}" if self.method == INSPECTOR else self.method

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SettingResult:
        return cls(**data)


@dataclass
class ExamplePanel:
    """One picture of the examples grid: an image, its map and the decision drawn on it."""

    caption: str  # why it was picked, e.g. "highest-scoring good"
    path: str
    label: int
    defect: str
    score: float
    threshold: float
    image: np.ndarray  # (H, W, 3) uint8
    anomaly_map: np.ndarray  # (H, W) float32
    mask: np.ndarray | None  # (H, W) bool ground truth, None without masks
    regions: list[Region]
    scale: tuple[float, float]  # (vmin, vmax) colour scale from the references (visualize.inspection_scale rule)


@dataclass
class EvalRun:
    results: list[SettingResult]  # ordered by category, k, seed
    computed: list[tuple[str, int, int]]  # settings scored in this run
    reused: list[tuple[str, int, int]]  # settings read back from the cache
    seconds: float


def fingerprint(config: EvalConfig) -> dict[str, Any]:
    """What every cached result depends on; categories, shots and seeds only select which results exist."""
    preset = to_dict(config.preset)
    preset.pop("name")  # a renamed copy of the same preset gives the same numbers
    root = None if config.dataset == "elpv" or config.root is None else str(Path(config.root).resolve())
    base = {"protocol": EVAL_PROTOCOL, "dataset": config.dataset, "root": root, "preset": preset}
    if config.half != "all":
        base["half"] = config.half
    if config.zero_shot == "batch":  # k = 0 means the decoder otherwise
        base["zero_shot"] = config.zero_shot
    return {**base, "full_shot_test_fraction": config.test_fraction} if config.full_shot else base


def plain_json(data: Any) -> Any:
    """data as json.loads would return it (tuples become lists), for comparisons with files."""
    return json.loads(json.dumps(data))


def flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {'preset.memory.sigma': 4.0, ...}, to name what changed."""
    if not isinstance(data, dict):
        return {prefix: data}
    joined = [(f"{prefix}.{name}" if prefix else str(name), item) for name, item in data.items()]
    return {key: value for name, item in joined for key, value in flat(item, name).items()}


def check_cache_config(out: Path, expected: dict[str, Any]) -> None:
    """EvalError when <out>/cache holds results of another configuration."""
    path = out / CACHE_DIR / CONFIG_FILE
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvalError(f"{path}: unreadable cache configuration ({error}); delete {out / CACHE_DIR}") from error
    wanted = plain_json(expected)
    if found != wanted:
        found_flat, wanted_flat = flat(found), flat(wanted)
        changed = sorted(k for k in wanted_flat.keys() | found_flat.keys() if found_flat.get(k) != wanted_flat.get(k))
        raise EvalError(
            f"{out} holds results of a different configuration ({', '.join(changed)} changed); "
            f"use another --out or delete {out / CACHE_DIR}"
        )


def safe_name(category: str) -> str:
    """A category name usable as a file name on any system."""
    return re.sub(r"[^\w.-]", "_", category) or "_"


def cache_path(out: Path, category: str, k: int, seed: int, method: str = INSPECTOR) -> Path:
    name = f"k{k}_seed{seed}" if method == INSPECTOR else f"{method}_seed{seed}"
    return out / CACHE_DIR / safe_name(category) / f"{name}.json"


def setting_key(base: dict[str, Any], category: str, k: int, seed: int) -> dict[str, Any]:
    return plain_json({**base, "category": category, "k": k, "seed": seed})


def load_cached(path: Path, key: dict[str, Any]) -> SettingResult | None:
    """The cached result at path when it belongs to key; None when missing, unreadable or stale."""
    try:
        data = json.loads(path.read_text())
        return SettingResult.from_dict(data["result"]) if data.get("key") == key else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None  # written atomically, so only a hand-edited file lands here: score it again


def image_paths(split: CategorySplit, held_out: bool) -> list[Path]:
    """Every image any draw can score: the test set, the pool when it doubles as test, the held-out set if asked."""
    paths = {sample.path for sample in split.test + (split.held_out if held_out else ())}
    if split.pool_is_test:
        paths.update(split.reference_pool)
    return sorted(paths)


def checked_size(shape: tuple[int, ...], path: Path, size: tuple[int, int] | None) -> tuple[int, int]:
    """The image's (H, W) from its shape; EvalError when it differs from the category's size (references must
    match queries)."""
    found = (int(shape[0]), int(shape[1]))
    if size is not None and found != size:
        raise EvalError(
            f"{path}: {found[1]}x{found[0]} px but other images of its category are {size[1]}x{size[0]} px; "
            "a category must have one image size"
        )
    return found


@torch.inference_mode()
def encode_category(inspector: Inspector, paths: Sequence[Path], desc: str, few_shot: bool = True) -> PatchCache:
    """Decode and encode every image once, as the few-shot memory sees them (or raw, for the zero-shot decoder);
    patches kept as float16 to halve the memory."""
    stages: list[torch.Tensor] = []
    size: tuple[int, int] | None = None
    start = time.perf_counter()
    for first in tqdm(range(0, len(paths), ENCODE_BATCH), desc=desc, unit="batch", leave=False, disable=None):
        batch = paths[first : first + ENCODE_BATCH]
        images = [load_image(path) for path in batch]
        for image, path in zip(images, batch, strict=True):
            size = checked_size(image.shape, path, size)
        patches = encode_images(inspector, images, few_shot)
        if not stages:
            stages = [torch.empty((len(paths), *p.shape[1:]), dtype=torch.float16) for p in patches]
        for stage, part in zip(stages, patches, strict=True):
            stage[first : first + len(batch)] = part
    assert size is not None, "encode_category needs at least one image"
    elapsed_ms = (time.perf_counter() - start) * 1000
    return PatchCache({path: i for i, path in enumerate(paths)}, stages, size, elapsed_ms / len(paths))


@torch.inference_mode()
def encode_images(inspector: Inspector, images: Sequence[np.ndarray], few_shot: bool) -> list[torch.Tensor]:
    """Per stage (B, C, h, w) float16 patches on the CPU of decoded images, as the few-shot memory sees them (or
    raw, for the zero-shot decoder); also what each actor of `eval --engine ray` runs (anomalygpt.engine_ray)."""
    shown = memory_inputs(images, inspector.preset.memory) if few_shot else images
    patches = inspector.backbone.encode(shown, batch_size=ENCODE_BATCH).patches
    return [part.to("cpu", torch.float16) for part in patches]


# encode_category's signature: (inspector, paths, progress description, few_shot) -> PatchCache
Encoder = Callable[[Inspector, Sequence[Path], str, bool], PatchCache]


def sample_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool ground truth; good images (and defects without a mask file) are all false."""
    if sample.mask is None:
        return np.zeros(shape, dtype=bool)
    return load_mask(sample.mask)


class MapScorer(Protocol):
    """What turns cached patches into maps and scores: a fitted PatchMemory, or the zero-shot decoder."""

    def maps_from_patches(self, patches: Sequence[torch.Tensor], size: tuple[int, int]) -> np.ndarray: ...

    def image_score(self, anomaly_map: np.ndarray) -> float: ...


@dataclass
class ZeroShotScorer:
    inspector: Inspector

    def maps_from_patches(self, patches: Sequence[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
        return self.inspector.zero_shot_maps(patches, size)

    def image_score(self, anomaly_map: np.ndarray) -> float:
        return top_mean(anomaly_map, self.inspector.preset.memory.top_fraction)


@dataclass(frozen=True)
class Fitted:
    """A setting's scorer and thresholds: k references indexed, or the decoder alone for k = 0."""

    scorer: MapScorer
    calibration: Calibration
    index_ms: float


def fit_setting(inspector: Inspector, reference_paths: Sequence[Path]) -> Fitted:
    if not reference_paths:
        return Fitted(ZeroShotScorer(inspector), inspector.zero_shot_calibration(), 0.0)
    references = inspector.fit(reference_paths)
    return Fitted(references.memory, references.calibration, references.index_ms)


@dataclass
class Scored:
    scores: np.ndarray  # (N,) image scores
    score_ms: float  # total map + score time, excluding metric bookkeeping


@torch.inference_mode()
def score_cached(
    memory: MapScorer, samples: Sequence[Sample], cache: PatchCache, on_map: Callable[[Sample, np.ndarray], None]
) -> Scored:
    """Image scores from cached patches; on_map sees every (H, W) map once, then it is dropped."""
    scores, elapsed = [], 0.0
    for first in range(0, len(samples), SCORE_BATCH):
        batch = samples[first : first + SCORE_BATCH]
        rows = torch.tensor([cache.index[sample.path] for sample in batch])
        start = time.perf_counter()
        maps = memory.maps_from_patches([stage[rows].float() for stage in cache.stages], cache.image_size)
        batch_scores = [memory.image_score(m) for m in maps]
        elapsed += time.perf_counter() - start
        scores.extend(batch_scores)
        for sample, anomaly_map in zip(batch, maps, strict=True):
            on_map(sample, anomaly_map)
    return Scored(np.asarray(scores, dtype=np.float64), elapsed * 1000)


def pixel_feeder(pixels: PixelMetrics) -> Callable[[Sample, np.ndarray], None]:
    """A callback folding each map and its mask into pixels, naming the mask when shapes disagree."""

    def feed(sample: Sample, anomaly_map: np.ndarray) -> None:
        try:
            pixels.add(anomaly_map, sample_mask(sample, anomaly_map.shape))
        except ValueError as error:
            raise EvalError(f"{sample.mask or sample.path}: {error}") from error

    return feed


def ignore_map(sample: Sample, anomaly_map: np.ndarray) -> None:
    """on_map for datasets without masks."""


def has_masks(split: CategorySplit) -> bool:
    return any(sample.mask is not None for sample in split.test)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MB; None where the OS does not report it."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def pixel_figures(pixels: PixelMetrics | None) -> Metrics:
    """Pixel AUROC, AUPRO, F1-max (None each without masks) and how many masks vanished in the resize."""
    if pixels is None:
        return {"pixel_auroc": None, "aupro": None, "pixel_f1_max": None, "pixel_masks_emptied": None}
    summary = pixels.compute()
    keys = ("pixel_auroc", "aupro", "pixel_f1_max", "pixel_masks_emptied")
    return {key: summary[key] for key in keys}


def detection_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, pixels: PixelMetrics | None) -> Metrics:
    """Image and pixel metrics, and the verdicts' at threshold, with the test set's class counts."""
    return {
        **image_metrics(labels, scores),
        **pixel_figures(pixels),
        **verdict_metrics(labels, scores > threshold),
        "threshold": threshold,
        "n_good": int((labels == 0).sum()),
        "n_defective": int(labels.sum()),
    }


def setting_metrics(
    labels: np.ndarray,
    scored: Scored,
    calibration: Calibration,
    index_ms: float,
    pixels: PixelMetrics | None,
    cache: PatchCache,
) -> Metrics:
    """Image, pixel and verdict metrics at the automatic threshold, plus timings."""
    score_ms = scored.score_ms / len(labels)
    return {
        **detection_metrics(labels, scored.scores, calibration.image_threshold, pixels),
        "encode_ms_per_image": cache.encode_ms_per_image,
        "score_ms_per_image": score_ms,
        "ms_per_image": cache.encode_ms_per_image + score_ms,
        "index_ms": index_ms,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_setting(
    inspector: Inspector, split: CategorySplit, cache: PatchCache, k: int, seed: int, held_out: bool
) -> SettingResult:
    """Fit k references drawn with seed, score the test (and held-out) images from the cache, compute metrics."""
    reference_paths, test = draw_shots(split, k, seed)
    fitted = fit_setting(inspector, reference_paths)
    labels = np.array([sample.label for sample in test])
    pixels = PixelMetrics() if has_masks(split) else None
    scored = score_cached(fitted.scorer, test, cache, ignore_map if pixels is None else pixel_feeder(pixels))
    held = score_cached(fitted.scorer, split.held_out if held_out else (), cache, ignore_map).scores
    metrics = setting_metrics(labels, scored, fitted.calibration, fitted.index_ms, pixels, cache)
    threshold = fitted.calibration.image_threshold
    metrics["held_out_flagged"] = float((held > threshold).mean()) if held.size else None
    return SettingResult(
        category=split.category,
        k=k,
        seed=seed,
        metrics=metrics,
        references=[str(path) for path in reference_paths],
        paths=[str(sample.path) for sample in test],
        labels=labels.tolist(),
        defects=[sample.defect for sample in test],
        scores=scored.scores.tolist(),
        calibration=fitted.calibration.to_dict(scores=True),
        held_out_scores=held.tolist(),
    )


@torch.inference_mode()
def run_batch_setting(inspector: Inspector, split: CategorySplit, cache: PatchCache) -> SettingResult:
    """Zero-shot from the batch: the category's test images scored against each other (anomalygpt.mutual), the
    threshold from their own scores; the `k = 0` row of `eval --zero-shot batch`."""
    _, test = draw_shots(split, 0, 0)
    labels = np.array([sample.label for sample in test])
    start = time.perf_counter()
    feats = batch_features(cache, [sample.path for sample in test], inspector.preset.memory.neighbourhood)
    maps, scores = inspector.batch_scores(feats, cache.image_size)
    elapsed = (time.perf_counter() - start) * 1000
    calibration = batch_calibration(scores)
    pixels = PixelMetrics() if has_masks(split) else None
    if pixels is not None:
        feed = pixel_feeder(pixels)
        for sample, small in zip(test, maps, strict=True):
            feed(sample, fuse_maps([small[None]], cache.image_size, inspector.preset.memory.sigma)[0])
    return SettingResult(
        category=split.category,
        k=0,
        seed=0,
        metrics=setting_metrics(labels, Scored(scores, elapsed), calibration, 0.0, pixels, cache),
        references=[],
        paths=[str(sample.path) for sample in test],
        labels=labels.tolist(),
        defects=[sample.defect for sample in test],
        scores=scores.tolist(),
        calibration=calibration.to_dict(),
    )


def batch_features(cache: PatchCache, paths: Sequence[Path], neighbourhood: int) -> torch.Tensor:
    """(N, C, h, w) float16 embedded deepest-stage features of a batch's images, as mutual scoring reads them."""
    rows = torch.tensor([cache.index[path] for path in paths])
    return torch.cat(
        [embed_patches([cache.stages[-1][chunk].float()], neighbourhood)[0].half() for chunk in rows.split(64)]
    )


def progress_line(result: SettingResult) -> str:
    m = result.metrics
    text = f"{result.category} k={result.k} seed={result.seed}: image AUROC {m['auroc']:.3f}"
    if m["pixel_auroc"] is not None:
        text += f", pixel AUROC {m['pixel_auroc']:.3f}, AUPRO {m['aupro']:.3f}"
    return text + f", false alarms {m['false_alarm_rate']:.3f}, recall {m['recall']:.3f}"


def run_category(
    inspector: Inspector,
    config: EvalConfig,
    split: CategorySplit,
    base: dict[str, Any],
    run: EvalRun,
    bar: tqdm,
    encode: Encoder = encode_category,
) -> None:
    """Every (k, seed) of one category: cached ones read back, the others scored from one encoding."""
    settings = [(k, seed) for k in config.shots for seed in config.seeds]
    base = {**base, "held_out": config.held_out}  # per setting: asking for it rescores only what lacks it
    found = {
        s: load_cached(cache_path(config.out, split.category, *s), setting_key(base, split.category, *s))
        for s in settings
    }
    pending = [s for s in settings if found[s] is None]
    bar.set_description(split.category)
    paths = image_paths(split, config.held_out)
    few_shot = config.zero_shot != "text"  # the decoder reads raw images; the batch, as the memory does
    cache = encode(inspector, paths, f"encode {split.category}", few_shot) if pending else None
    for k, seed in settings:
        result = found[(k, seed)]
        if result is None:
            assert cache is not None
            if config.zero_shot == "batch":
                result = run_batch_setting(inspector, split, cache)
            else:
                result = run_setting(inspector, split, cache, k, seed, config.held_out)
            key = setting_key(base, split.category, k, seed)
            write_json_atomic(cache_path(config.out, split.category, k, seed), {"key": key, "result": result.to_dict()})
            run.computed.append((split.category, k, seed))
            tqdm.write(progress_line(result), file=sys.stderr)
        else:
            run.reused.append((split.category, k, seed))
        run.results.append(result)
        bar.update()


CategoryRunner = Callable[[Inspector, EvalConfig, CategorySplit, dict[str, Any], EvalRun, tqdm], None]


def run_eval(
    inspector: Inspector, config: EvalConfig, splits: dict[str, CategorySplit], encode: Encoder = encode_category
) -> EvalRun:
    """Score every (category, k, seed), reusing finished ones from <out>/cache; with baselines, every method too.
    `encode` makes each category's patch cache (the k-shot rows only: another is `eval --engine ray`'s)."""
    if config.full_shot:
        from eval import compare  # it builds on this module

        return run_settings(inspector, config, splits, compare.run_category, len(compare.settings_of(config)))
    runner = functools.partial(run_category, encode=encode)
    return run_settings(inspector, config, splits, runner, len(config.shots) * len(config.seeds))


def run_settings(
    inspector: Inspector,
    config: EvalConfig,
    splits: dict[str, CategorySplit],
    category_runner: CategoryRunner,
    per_category: int,
) -> EvalRun:
    start = time.perf_counter()
    base = fingerprint(config)
    check_cache_config(config.out, base)
    write_json_atomic(config.out / CACHE_DIR / CONFIG_FILE, base)
    run = EvalRun([], [], [], 0.0)
    with tqdm(total=len(config.categories) * per_category, unit="setting", disable=None) as bar:
        for category in config.categories:
            category_runner(inspector, config, splits[category], base, run, bar)
    run.seconds = time.perf_counter() - start
    return run


def example_picks(result: SettingResult) -> list[tuple[str, int]]:
    """(caption, index) of the images worth looking at: best and worst of each class and the borderline ones."""
    scores, labels = np.asarray(result.scores), np.asarray(result.labels)
    threshold = float(result.metrics["threshold"] or 0.0)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    wanted = [
        ("highest-scoring defective", bad, scores),
        ("lowest-scoring defective", bad, -scores),
        ("highest-scoring good", good, scores),
        ("defective nearest the threshold", bad, -np.abs(scores - threshold)),
        ("good nearest the threshold", good, -np.abs(scores - threshold)),
    ]
    picks: list[tuple[str, int]] = []
    for caption, members, key in wanted:
        if members.size and (index := int(members[np.argmax(key[members])])) not in {i for _, i in picks}:
            picks.append((caption, index))
    return picks


def panel_mask(sample: Sample | None, shape: tuple[int, int]) -> np.ndarray:
    """Ground truth of a picked image; pool images scored as good samples are not in split.test."""
    return np.zeros(shape, dtype=bool) if sample is None else sample_mask(sample, shape)


def colour_scale(calibration: Calibration) -> tuple[float, float]:
    """(vmin, vmax): the references' normal mean, and the threshold mirrored above it (visualize.inspection_scale)."""
    vmin = calibration.normal_mean
    return vmin, vmin + 2.0 * max(calibration.image_threshold - vmin, 1e-6)


@torch.inference_mode()
def example_panels(
    inspector: Inspector, split: CategorySplit, result: SettingResult, zero_shot: str = ""
) -> list[ExamplePanel]:
    """Maps of the picked images, recomputed (the run keeps no maps) from float16 patches as the run scored them."""
    picks = example_picks(result)
    images = [load_image(result.paths[index]) for _, index in picks]  # each (H, W, 3) uint8
    if zero_shot == "batch":
        maps, scores, calibration = batch_example_maps(inspector, result, [index for _, index in picks])
    else:
        maps, scores, calibration = fitted_example_maps(inspector, result, images)
    samples = {str(sample.path): sample for sample in split.test}
    panels = []
    for (caption, index), image, anomaly_map, score in zip(picks, images, maps, scores, strict=True):
        path = result.paths[index]
        panels.append(
            ExamplePanel(
                caption=caption,
                path=path,
                label=result.labels[index],
                defect=result.defects[index],
                score=score,
                threshold=calibration.image_threshold,
                image=image,
                anomaly_map=anomaly_map,
                mask=panel_mask(samples.get(path), anomaly_map.shape) if has_masks(split) else None,
                regions=decide(anomaly_map, image, score, calibration).regions,
                scale=colour_scale(calibration),
            )
        )
    return panels


def fitted_example_maps(
    inspector: Inspector, result: SettingResult, images: Sequence[np.ndarray]
) -> tuple[np.ndarray, list[float], Calibration]:
    """(P, H, W) maps of the picked images against the setting's references (or the decoder's), scores, thresholds."""
    fitted = fit_setting(inspector, [Path(path) for path in result.references])
    shown = memory_inputs(images, inspector.preset.memory) if result.k > 0 else images
    patches = [p.half().float() for p in inspector.backbone.encode(shown, batch_size=ENCODE_BATCH).patches]
    maps = fitted.scorer.maps_from_patches(patches, images[0].shape[:2])
    return maps, [fitted.scorer.image_score(m) for m in maps], fitted.calibration


def batch_example_maps(
    inspector: Inspector, result: SettingResult, indices: Sequence[int]
) -> tuple[np.ndarray, list[float], Calibration]:
    """(P, H, W) maps of the picked images of a zero-shot batch, scores and the run's thresholds: each map is made
    against the other images, so the whole batch is encoded again, but only the picked images' maps are made."""
    cfg = inspector.preset.memory
    paths = [Path(path) for path in result.paths]
    cache = encode_category(inspector, paths, "examples", True)
    feats = batch_features(cache, paths, cfg.neighbourhood)
    small, scores = inspector.batch_scores(feats, cache.image_size, rows=indices)
    return fuse_maps([small], cache.image_size, cfg.sigma), scores.tolist(), Calibration(**result.calibration)
