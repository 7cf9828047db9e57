"""Thresholds from the good references alone: held-out scores of the references, then a margin rule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from anomalygpt.memory import PatchMemory
from anomalygpt.verdict import Calibration, top_mean


@dataclass(frozen=True)
class CalibrationConfig:
    z: float = 3.0  # image threshold = mean + z * spread of the held-out normal scores (bench/bench_calibration.py)
    # A few references give an unstable std (with one, the held-out quadrants show only the variation inside one
    # image), so the spread has a floor, relative to the mean, that shrinks as 1/sqrt(k): spread_prior / sqrt(k).
    # 0.2: false alarms 1.1%, 7.4%, 4.1% at k = 1, 2, 4 on stationary textures (bench/bench_calibration.py).
    spread_prior: float = 0.2
    # With enough held-out references (at least (1 - rate) / rate: 49 at 2 %) the image threshold is instead their
    # conformal quantile, the ceil((n + 1) * (1 - rate))-th smallest of n held-out scores: a good query scored like
    # them passes it with a probability of at most `false_alarm_rate`, whatever their distribution. ELPV dev half,
    # pools of 208-319 good cells, seeds 0-4 (bench/bench_pools.py --parts rule --half dev): false alarms 2.0 % mono /
    # 2.2 % poly (worst draw 4.5 %) and recall 66 % / 54 %, against 0.9 % / 1.2 % and 59 % / 40 % with mean + 3
    # spreads of 32 of them; at 3 % a draw passed 5 %.
    false_alarm_rate: float = 0.02
    pixel_quantile: float = 0.999  # pixel threshold: this quantile of the values of PIXEL_MAPS held-out maps
    max_held_out: int = 512  # a larger pool is calibrated on a seeded sample of this many held-out references
    seed: int = 0


MAX_FALSE_ALARM_RATE = 0.5  # the highest false_alarm_rate a preset, fit or the service takes
PIXEL_MAPS = 32  # held-out maps (a seeded sample of more) whose values set the pixel threshold: 3.3 M at 320 px


class HeldOut(NamedTuple):
    maps: Iterator[np.ndarray]  # the held-out anomaly maps, computed as they are read
    views: int  # maps per held-out reference, its identity view (scored as a query is) first
    method: str  # how they were formed, in words


def held_out_maps(memory: PatchMemory, held_out: dict[int, list[torch.Tensor]]) -> HeldOut:
    """Anomaly maps of references scored against a memory that excludes them, as a query would be scored.

    held_out: reference index -> per stage (V, C, h, w) embedded features of its views (the views in the memory).
    k >= 2: each held-out reference against the other references (with retrieval: against its nearest others;
    then only its identity view, as queries come). k = 1: each quadrant of the reference against a memory without
    that quadrant's patches; only the held-out quadrant of the map is kept, so every score is of patches the
    memory has not seen.
    """
    if memory.n_references >= 2:
        how = "its nearest others" if memory.retrieval else "the others"
        views = 1 if memory.retrieval else next(iter(held_out.values()))[0].shape[0]
        method = f"leave-one-out: {len(held_out)} of {memory.n_references} references each scored against {how}"
        return HeldOut(leave_one_reference_out(memory, held_out), views, method)
    method = "k=1: each quadrant of the reference scored against the other three"
    return HeldOut(leave_one_quadrant_out(memory, held_out[0]), 4, method)


@torch.inference_mode()
def leave_one_reference_out(memory: PatchMemory, held_out: dict[int, list[torch.Tensor]]) -> Iterator[np.ndarray]:
    everyone = torch.arange(memory.n_references)
    for ref, views in held_out.items():
        if memory.retrieval:
            views = [feats[:1] for feats in views]
            others = memory.nearest_references(memory.descriptors[ref : ref + 1], exclude=ref)[0]
        else:
            others = everyone[everyone != ref]
        distances = memory.stage_distances(views, memory.bank_of(others))
        yield from memory.fuse(memory.with_prior(views, distances), memory.image_size)


@torch.inference_mode()
def leave_one_quadrant_out(memory: PatchMemory, views: list[torch.Tensor]) -> Iterator[np.ndarray]:
    height, width = memory.image_size
    identity = [feats[:1] for feats in views]
    for quadrant in range(4):
        banks = [
            bank.features[bank.quadrant(feats.shape[-1]) != quadrant].float()
            for bank, feats in zip(memory.banks, views, strict=True)
        ]
        full = memory.fuse(memory.with_prior(identity, memory.stage_distances(identity, banks)), memory.image_size)[0]
        row, col = divmod(quadrant, 2)
        yield full[row * height // 2 : (row + 1) * height // 2, col * width // 2 : (col + 1) * width // 2]


def held_out_choice(n_references: int, cfg: CalibrationConfig) -> list[int]:
    """The references scored held out: all of them, or a seeded sample of max_held_out from a larger pool."""
    if n_references <= cfg.max_held_out:
        return list(range(n_references))
    return sorted(np.random.default_rng(cfg.seed).choice(n_references, cfg.max_held_out, replace=False).tolist())


def conformal_rank(n_scores: int, false_alarm_rate: float) -> int | None:
    """1-based rank among n held-out scores of the conformal threshold at that rate; None when n is too few."""
    rank = math.ceil((n_scores + 1) * (1 - false_alarm_rate) - 1e-9)
    return rank if rank <= n_scores else None


def min_conformal_references(false_alarm_rate: float) -> int:
    """The fewest held-out references whose conformal threshold keeps that rate: (1 - rate) / rate, rounded up."""
    n_scores = max(1, math.ceil((1 - false_alarm_rate) / false_alarm_rate - 1e-9))
    while conformal_rank(n_scores, false_alarm_rate) is None:  # floating point at the boundary
        n_scores += 1
    return n_scores


def calibrate(memory: PatchMemory, held_out: dict[int, list[torch.Tensor]], cfg: CalibrationConfig) -> Calibration:
    maps, views, method = held_out_maps(memory, held_out)
    n_maps = len(held_out) * views
    pick = range(n_maps) if n_maps <= PIXEL_MAPS else np.random.default_rng(cfg.seed).choice(n_maps, PIXEL_MAPS, False)
    for_pixels = set(pick)
    values, pixels = [], []
    for index, anomaly_map in enumerate(maps):  # one map at a time: 512 maps of a large image would not fit
        values.append(top_mean(anomaly_map, memory.cfg.top_fraction))
        if index in for_pixels:
            pixels.append(anomaly_map.ravel())
    scores = np.array(values)
    # One score per held-out reference, as a query is scored (with k = 1 the quadrants are one image's: none).
    as_queries = scores[::views] if memory.n_references >= 2 else np.empty(0)
    mean, spread, raw = normal_statistics(scores, memory.n_references, cfg)
    image_threshold, rule, rate = threshold_rule(scores, as_queries, memory.n_references, cfg)
    # Regions of an anomalous image must exist: the pixel threshold never exceeds the image threshold.
    pixel_threshold = min(float(np.quantile(np.concatenate(pixels), cfg.pixel_quantile)), image_threshold)
    return Calibration(
        image_threshold,
        pixel_threshold,
        mean,
        spread,
        scores.size,
        f"{method}; threshold: {rule}",
        raw,
        tuple(as_queries.tolist()),
        rate,
    )


def normal_statistics(scores: np.ndarray, n_references: int, cfg: CalibrationConfig) -> tuple[float, float, float]:
    """Mean, spread (their std with its floor, the unit of margins) and raw std of the held-out scores."""
    mean = float(scores.mean())
    raw = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    return mean, max(raw, cfg.spread_prior / math.sqrt(n_references) * mean, 1e-6), raw


def threshold_rule(
    scores: np.ndarray, as_queries: np.ndarray, n_references: int, cfg: CalibrationConfig
) -> tuple[float, str, float | None]:
    """The image threshold, its rule in words and the conformal rate when that rule set it: the conformal quantile
    of the per-reference scores (as_queries) when there are enough of them, else mean + z spreads of every
    held-out score (rate None)."""
    rank = conformal_rank(as_queries.size, cfg.false_alarm_rate)
    if rank is None:
        mean, spread, _ = normal_statistics(scores, n_references, cfg)
        return mean + cfg.z * spread, f"mean + {cfg.z:g} spreads of the held-out scores", None
    rule = (
        f"held-out score {rank} of {as_queries.size} from the lowest (expected false alarms at most "
        f"{cfg.false_alarm_rate:.1%} on good parts like them)"
    )
    return float(np.sort(as_queries)[rank - 1]), rule, cfg.false_alarm_rate


def fixed_calibration(
    normal_mean: float, normal_spread: float, pixel_value: float, n_scores: int, cfg: CalibrationConfig, method: str
) -> Calibration:
    """Thresholds from stored statistics of normal scores (zero-shot: simulated validation normals), same rule."""
    spread = max(normal_spread, 1e-6)
    image_threshold = normal_mean + cfg.z * spread
    return Calibration(image_threshold, min(pixel_value, image_threshold), normal_mean, spread, n_scores, method)
