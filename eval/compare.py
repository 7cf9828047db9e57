"""Methods side by side (`anomalygpt eval --method inspector,patchcore,...`): one split, one run, one table.

Per category and seed, `full_shot_split` holds a seeded share of the good images out for testing (where the
reference pool doubles as test data); every baseline trains on all the other good images, and the Inspector draws
its k references from those same training images, so every method is scored on the same test images.

Timings stay fair although the methods share one FeatureCache per category (each image goes through the backbone
once): every method is charged the measured per-image backbone cost for each image whose features it asks for,
in training and in scoring, in place of the cache's actual (mostly zero) work.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from anomalygpt.detector import Detector, FeatureCache, FitReport, Stopwatch, build_detector, load_batches
from anomalygpt.inspection import Inspector
from anomalygpt.io import load_image, write_json_atomic
from eval.datasets import CategorySplit, Sample, full_shot_split
from eval.metrics import PixelMetrics
from eval.runner import (
    INSPECTOR,
    SCORE_BATCH,
    EvalConfig,
    EvalRun,
    Metrics,
    SettingResult,
    cache_path,
    detection_metrics,
    has_masks,
    ignore_map,
    load_cached,
    peak_rss_mb,
    pixel_feeder,
    plain_json,
    progress_line,
    safe_name,
    setting_key,
)

WORK_DIR = "work"  # <out>/work/<category>/<method>_seed<seed>/: baseline checkpoints, so a killed run resumes
T = TypeVar("T")


@dataclass(frozen=True)
class Costs:
    """Per-image costs of one category, measured while every image is encoded into the shared cache."""

    decode_ms: float
    encode_ms: float  # backbone alone


@dataclass(frozen=True)
class Timed:
    seconds: float  # wall time with the shared cache's work replaced by the per-image backbone cost
    backbone_seconds: float  # the charged part
    served: int  # images whose features were asked for


def charged(features: FeatureCache, costs: Costs, work: Callable[[], T]) -> tuple[T, Timed]:
    """work() and its time, charging costs.encode_ms for every image it asked the cache for."""
    served, spent = features.served, features.encode_seconds
    watch = Stopwatch()
    value = work()
    asked = features.served - served
    backbone = asked * costs.encode_ms / 1000
    return value, Timed(watch.seconds - (features.encode_seconds - spent) + backbone, backbone, asked)


@torch.inference_mode()
def preload(features: FeatureCache, paths: Sequence[Path], category: str) -> Costs:
    """Encode every image of the category into the cache; the measured decode and backbone cost per image."""
    decode_seconds, encoded, spent = 0.0, features.encoded, features.encode_seconds
    watch = Stopwatch()
    for batch in load_batches(paths, f"encode {category}"):
        decode_seconds += watch.seconds
        features.patches(batch)
        watch = Stopwatch()
    encode_ms = 1000 * (features.encode_seconds - spent) / max(1, features.encoded - encoded)
    return Costs(1000 * decode_seconds / len(paths), encode_ms)


def category_images(split: CategorySplit, held_out: bool) -> list[Path]:
    paths = {*split.reference_pool, *(s.path for s in split.test), *(s.path for s in split.held_out if held_out)}
    return sorted(paths)


def references(train: Sequence[Path], k: int, seed: int) -> list[Path]:
    """k of the training images, nested across k for one seed, drawn apart from the test hold-out's draw."""
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    return [train[i] for i in order[:k]]


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # (N,)
    timed: Timed  # all batches together


def score_samples(
    detector: Detector, samples: Sequence[Sample], features: FeatureCache, costs: Costs, pixels: PixelMetrics | None
) -> Scored:
    """Scores of samples in batches; each map goes to the pixel metrics and is dropped."""
    feed = ignore_map if pixels is None else pixel_feeder(pixels)
    scores: list[float] = []
    seconds = backbone = 0.0
    served = 0
    for first in range(0, len(samples), SCORE_BATCH):
        batch = samples[first : first + SCORE_BATCH]
        images = [load_image(sample.path) for sample in batch]
        prediction, timed = charged(features, costs, functools.partial(detector.predict, images))
        seconds, backbone, served = seconds + timed.seconds, backbone + timed.backbone_seconds, served + timed.served
        scores.extend(float(score) for score in prediction.scores)
        for sample, anomaly_map in zip(batch, prediction.maps, strict=True):
            feed(sample, anomaly_map)
    return Scored(np.asarray(scores, dtype=np.float64), Timed(seconds, backbone, served))


def timing_metrics(fit: FitReport, fit_time: Timed, scored: Scored, costs: Costs, n: int) -> Metrics:
    """Per image: decode + backbone (charged) and the method's own scoring; training time with backbone charged."""
    encode_ms = costs.decode_ms + 1000 * scored.timed.backbone_seconds / n
    score_ms = 1000 * (scored.timed.seconds - scored.timed.backbone_seconds) / n
    return {
        "encode_ms_per_image": encode_ms,
        "score_ms_per_image": score_ms,
        "ms_per_image": encode_ms + score_ms,
        "index_ms": 1000 * fit_time.seconds,
        "fit_seconds": fit_time.seconds,
        "n_train": fit.n_images,
        "peak_rss_mb": peak_rss_mb(),
    }


@dataclass(frozen=True)
class Setting:
    method: str
    k: int  # Inspector: references; baseline: 0 until the split is known (then every training image)
    seed: int


def detector_config(detector: Detector) -> dict[str, Any]:
    """The method's own configuration, so cached results of other defaults are not reused."""
    config = detector.config
    is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
    return plain_json(dataclasses.asdict(config)) if is_instance else {}


def run_setting(
    detector: Detector,
    normals: Sequence[Path],
    test: Sequence[Sample],
    context: CategoryContext,
    setting: Setting,
    workdir: Path | None,
) -> SettingResult:
    split, features, costs = context.split, context.features, context.costs
    fit, fit_time = charged(features, costs, lambda: detector.fit(normals, workdir))
    pixels = PixelMetrics() if has_masks(split) else None
    scored = score_samples(detector, test, features, costs, pixels)
    held = score_samples(detector, split.held_out if context.held_out else (), features, costs, None).scores
    labels = np.array([sample.label for sample in test])
    metrics = {
        **detection_metrics(labels, scored.scores, fit.threshold, pixels),
        **timing_metrics(fit, fit_time, scored, costs, len(test)),
        "held_out_flagged": float((held > fit.threshold).mean()) if held.size else None,
    }
    return SettingResult(
        category=split.category,
        k=len(normals),
        seed=setting.seed,
        metrics=metrics,
        references=[str(path) for path in normals] if setting.method == INSPECTOR else [],
        paths=[str(sample.path) for sample in test],
        labels=labels.tolist(),
        defects=[sample.defect for sample in test],
        scores=scored.scores.tolist(),
        calibration={
            "image_threshold": fit.threshold,
            "method": fit.threshold_rule,
            "resumed": fit.resumed,
            "reference_scores": list(fit.reference_scores),
        },
        held_out_scores=held.tolist(),
        method=setting.method,
    )


@dataclass
class CategoryContext:
    split: CategorySplit
    features: FeatureCache
    costs: Costs
    held_out: bool


def settings_of(config: EvalConfig) -> list[Setting]:
    """Seed-major, so each seed's split is drawn once; the Inspector once per k, a baseline once."""
    return [
        Setting(method, k, seed)
        for seed in config.seeds
        for method in config.methods
        for k in (config.shots if method == INSPECTOR else (0,))
    ]


def run_category(
    inspector: Inspector, config: EvalConfig, split: CategorySplit, base: dict[str, Any], run: EvalRun, bar: tqdm
) -> None:
    """Every (method, k, seed) of one category: cached ones read back, the others fitted and scored."""
    features = FeatureCache(inspector.backbone, keep=True)
    context: CategoryContext | None = None
    bar.set_description(split.category)
    for setting in settings_of(config):
        train, test = full_shot_split(split, setting.seed, config.test_fraction)
        is_inspector = setting.method == INSPECTOR
        detector = build_detector(setting.method, features, setting.seed, inspector)
        key = setting_key(
            {**base, "held_out": config.held_out, "method": setting.method, "method_config": detector_config(detector)},
            split.category,
            setting.k if is_inspector else len(train),
            setting.seed,
        )
        path = cache_path(config.out, split.category, setting.k, setting.seed, setting.method)
        result = load_cached(path, key)
        if result is None:
            if context is None:
                costs = preload(features, category_images(split, config.held_out), split.category)
                context = CategoryContext(split, features, costs, config.held_out)
            normals = references(train, setting.k, setting.seed) if is_inspector else train
            workdir = None if is_inspector else config.out / WORK_DIR / safe_name(split.category) / path.stem
            result = run_setting(detector, normals, test, context, setting, workdir)
            write_json_atomic(path, {"key": key, "result": result.to_dict()})
            run.computed.append((split.category, result.k, setting.seed))
            tqdm.write(f"{setting.method} " + progress_line(result), file=sys.stderr)
        else:
            run.reused.append((split.category, result.k, setting.seed))
        run.results.append(result)
        bar.update()
    features.forget()
