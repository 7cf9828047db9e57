"""Regions an operator can act on (issue 20): count, boxes and AUPRO on simulated defects with masks, and region
sizes on real ELPV cells.

Simulated part: per picture and seed, 4 good crops of the picture's top half are the references; the queries are
--good good crops and --defective crops of its bottom half carrying 1 to 3 simulated defects each (simulation.
anomalies, generic parameters), placed so that no two touch (each is one true region). Every query is inspected
4-shot once; each region-extraction variant is then applied to the same maps at the inspection's own pixel
threshold. Reported per variant, over the defective queries: count accuracy (regions == defects; a query judged
normal has none), mean box IoU (each true defect's best-overlapping region box) and the share of defects no box
touches; and once, AUPRO of the maps (not a region figure, but the pixel localisation they rest on).
--pictures train makes the choices (SPLIT_DEPTH, the peak rule); --pictures test (held-out) reports.

ELPV part: 4-shot on defective cells of one half (--half dev for choices, test for figures), seeds 0-4: share
of inspections with a region over 50 % of the image, regions under the minimum area, regions per inspection.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_regions.py --pictures train --out runs/bench_regions_train.json
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_regions.py --pictures test --half test --out runs/bench_regions.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from anomalygpt.inspection import Inspection, Inspector, build_inspector
from anomalygpt.io import load_image, write_json_atomic
from anomalygpt.references import InspectionError
from anomalygpt.regions import Region, find_regions
from eval.datasets import elpv_half, load_split
from eval.metrics import aupro
from simulation.anomalies import SimulationError, load_params, simulate_random
from simulation.normals import PICTURE_SETS, band_crops, picture

MAX_DEFECTS = 3
GAP_PX = 12  # simulated defects of one query stay this far apart: each is one true region
PLACEMENT_TRIES = 20


@dataclass(frozen=True)
class Variant:
    name: str
    split_depth: float | None  # find_regions' split_depth
    peak_rule: str  # "all": every region over the minimum area; "strong": only those peaking above the image
    # threshold; "shipped": the inspection's own regions (anomalygpt.verdict.decide)
    stride_area: bool = True  # minimum area from the map's resolution (else the old 0.01 % of the image)


VARIANTS = (
    Variant("shipped (decide)", None, "shipped"),
    Variant("components, 0.01% min area (before)", None, "all", stride_area=False),
    Variant("components", None, "all"),
    Variant("split 0.25", 0.25, "all"),
    Variant("split 0.5", 0.5, "all"),
    Variant("split 0.75", 0.75, "all"),
    Variant("components, strong peaks", None, "strong"),
    Variant("split 0.25, strong peaks", 0.25, "strong"),
    Variant("split 0.5, strong peaks", 0.5, "strong"),
    Variant("split 0.75, strong peaks", 0.75, "strong"),
)


def regions_of(inspection: Inspection, image: np.ndarray, variant: Variant) -> list[Region]:
    """The regions this variant extracts from the inspection's map (none for a query judged normal)."""
    if not inspection.is_anomalous:
        return []
    if variant.peak_rule == "shipped":
        return inspection.regions
    assert inspection.anomaly_map is not None
    min_area = inspection.min_region_px if variant.stride_area else None
    found = find_regions(inspection.anomaly_map, inspection.pixel_threshold, image, min_area, variant.split_depth)
    if variant.peak_rule == "strong":
        found = [region for region in found if region.peak_score > inspection.threshold]
    return found


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def with_defects(
    image: np.ndarray, n: int, sources: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image with up to n simulated defects, no two within GAP_PX; (image, one mask per defect)."""
    params = load_params(None)
    masks: list[np.ndarray] = []
    for _ in range(n):
        for _ in range(PLACEMENT_TRIES):
            try:
                result = simulate_random(image, sources, params, rng)
            except SimulationError:
                continue
            near = ndimage.binary_dilation(result.mask, iterations=GAP_PX)
            # One true region: the defect is one piece, and apart from the others.
            if ndimage.label(result.mask, structure=np.ones((3, 3)))[1] == 1 and not any(
                (near & m).any() for m in masks
            ):
                image, masks = result.image, [*masks, result.mask]
                break
    return image, masks


def simulated_rows(inspector: Inspector, name: str, seed: int, args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    image = picture(name)
    half = image.shape[0] // 2
    size = min(args.size, half, image.shape[1])
    refs = band_crops(image, 4, size, (0, half), rng)
    crops = band_crops(image, args.good + 2 * args.defective, size, (half, image.shape[0]), rng)
    goods, bad_bases, sources = (
        crops[: args.good],
        crops[args.good : args.good + args.defective],
        crops[-args.defective :],
    )
    try:
        references = inspector.fit(refs)
    except InspectionError as error:  # e.g. a picture whose top half has blank crops
        print(f"{name} seed {seed}: skipped: {error}", flush=True)
        return []
    rows = []
    for query in goods:
        rows.append({"image": query, "masks": [], "inspection": inspector.inspect(query, references)})
    for base in bad_bases:
        query, masks = with_defects(base, int(rng.integers(1, MAX_DEFECTS + 1)), sources, rng)
        if masks:
            rows.append({"image": query, "masks": masks, "inspection": inspector.inspect(query, references)})
    return rows


def simulated_scores(rows: list[dict]) -> dict:
    defective = [row for row in rows if row["masks"]]
    maps = [row["inspection"].anomaly_map for row in rows]
    union = [
        np.any(row["masks"], axis=0) if row["masks"] else np.zeros(m.shape, bool)
        for row, m in zip(rows, maps, strict=True)
    ]
    out: dict = {
        "n_queries": len(rows),
        "n_defective": len(defective),
        "n_defects": sum(len(row["masks"]) for row in defective),
        "recall": float(np.mean([row["inspection"].is_anomalous for row in defective])),
        "aupro": float(aupro(maps, union)),
        "variants": {},
    }
    for variant in VARIANTS:
        counts, flagged_counts, ious, missed, over_half, on_good = [], [], [], 0, 0, 0
        for row in rows:
            found = regions_of(row["inspection"], row["image"], variant)
            over_half += any(region.area_pct > 50 for region in found)
            if not row["masks"]:
                on_good += len(found)
                continue
            counts.append(len(found) == len(row["masks"]))
            if row["inspection"].is_anomalous:
                flagged_counts.append(len(found) == len(row["masks"]))
            for mask in row["masks"]:
                best = max((box_iou(mask_box(mask), region.box) for region in found), default=0.0)
                ious.append(best)
                missed += best == 0.0
        out["variants"][variant.name] = {
            "count_accuracy": float(np.mean(counts)),
            "count_accuracy_flagged": float(np.mean(flagged_counts)) if flagged_counts else None,
            "box_iou": float(np.mean(ious)),
            "defects_missed": missed / max(1, len(ious)),
            "share_over_half": over_half / len(rows),
            "regions_on_good": on_good / max(1, len(rows) - len(defective)),
        }
    return out


def elpv_scores(inspector: Inspector, half: str, seeds: list[int], n_cells: int | None) -> dict:
    out: dict = {"variants": {}}
    per_variant: dict[str, dict[str, list]] = {
        v.name: {"over_half": [], "under_min": [], "count": []} for v in VARIANTS
    }
    for cell in ("mono", "poly"):
        split = elpv_half(load_split("elpv", None, cell), half)
        bad = [sample.path for sample in split.test if sample.label == 1][:n_cells]
        for seed in seeds:
            rng = np.random.default_rng(seed)
            refs = [str(split.reference_pool[i]) for i in rng.choice(len(split.reference_pool), 4, replace=False)]
            references = inspector.fit(refs)
            for path in bad:
                image = load_image(str(path))
                inspection = inspector.inspect(image, references)
                for variant in VARIANTS:
                    found = regions_of(inspection, image, variant)
                    stats = per_variant[variant.name]
                    if inspection.is_anomalous:
                        stats["over_half"].append(any(region.area_pct > 50 for region in found))
                        stats["count"].append(len(found))
                    stats["under_min"] += [region.area_px < (inspection.min_region_px or 0) for region in found]
    for name, stats in per_variant.items():
        out["variants"][name] = {
            "share_over_half": float(np.mean(stats["over_half"])),
            "regions_under_min_area": float(np.mean(stats["under_min"])) if stats["under_min"] else 0.0,
            "regions_per_flagged_cell": float(np.mean(stats["count"])),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", choices=("train", "test"), default="test")
    parser.add_argument("--max-pictures", type=int, default=None, help="first N pictures of the set")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--good", type=int, default=16)
    parser.add_argument("--defective", type=int, default=24)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--half", choices=("dev", "test", "none"), default="none", help="ELPV half for its part")
    parser.add_argument("--elpv-seeds", default="0,1,2,3,4")
    parser.add_argument("--elpv-cells", type=int, default=None, help="defective cells per type (default all)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_regions.json"))
    args = parser.parse_args()
    inspector = build_inspector("default")
    start = time.perf_counter()
    rows = []
    for name in PICTURE_SETS[args.pictures][: args.max_pictures]:
        for seed in map(int, args.seeds.split(",")):
            rows += simulated_rows(inspector, name, seed, args)
        print(f"{name}: {len(rows)} queries so far, {time.perf_counter() - start:.0f} s", flush=True)
    result = {"simulated": simulated_scores(rows), "pictures": args.pictures}
    if args.half != "none":
        seeds = [int(s) for s in args.elpv_seeds.split(",")]
        result["elpv"] = elpv_scores(inspector, args.half, seeds, args.elpv_cells)
        result["elpv_half"] = args.half
    sim = result["simulated"]
    print(
        f"\nsimulated ({args.pictures} pictures): {sim['n_defective']} defective queries, {sim['n_defects']} defects, "
        f"{sim['n_queries'] - sim['n_defective']} good; recall {sim['recall']:.3f}, AUPRO {sim['aupro']:.3f}"
    )
    print(
        "| variant | count accuracy | count accuracy, flagged | box IoU | defects missed | regions per good query "
        "| >50% of image |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, v in sim["variants"].items():
        print(
            f"| {name} | {v['count_accuracy']:.3f} | {v['count_accuracy_flagged']:.3f} | {v['box_iou']:.3f} | "
            f"{v['defects_missed']:.3f} | "
            f"{v['regions_on_good']:.2f} | {v['share_over_half']:.3f} |"
        )
    if "elpv" in result:
        print(f"\nELPV {args.half} half, defective cells judged anomalous, 4-shot seeds {args.elpv_seeds}")
        print("| variant | inspections with a region > 50% | regions under min area | regions per cell |")
        print("|---|---|---|---|")
        for name, v in result["elpv"]["variants"].items():
            print(
                f"| {name} | {v['share_over_half']:.3f} | {v['regions_under_min_area']:.3f} | "
                f"{v['regions_per_flagged_cell']:.2f} |"
            )
    result["machine"] = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(args.out, result)
    print(f"{result['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
