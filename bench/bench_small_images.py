"""How small an image can be before an inspection of it means little: ELPV cells shrunk to each side.

For each cell type and seed, 4 good references are drawn from the half (eval.datasets.draw_shots) and every test
cell of the half (1/3-labelled cells aside) is inspected against them, queries and references both shrunk to
--sides x --sides px (OpenCV's area interpolation, as a camera's coarser sensor would see them). Reported per side:
image AUROC (mean of mono and poly), the share of good cells flagged and of defective cells caught at the automatic
threshold, and how many inspections carry the reference-fit warning. Choices are made on --half dev; --half test
gives the figures. Saves after every side.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_small_images.py --half dev --out runs/bench_small_images_dev.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from anomalygpt.inspection import build_inspector
from anomalygpt.io import load_image, write_json_atomic
from eval.datasets import draw_shots, elpv_half, load_split


def shrunk(path: Path, side: int) -> np.ndarray:
    image = load_image(path)
    if image.shape[0] == side and image.shape[1] == side:
        return image
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)


def run_side(side: int, half: str, seeds: list[int], cells: int | None) -> dict[str, Any]:
    """Every cell type and seed at one side: AUROC, false alarms, recall, warned share."""
    inspector = build_inspector()
    rows = []
    for cell_type in ("mono", "poly"):
        split = elpv_half(load_split("elpv", None, cell_type), half)
        for seed in seeds:
            refs, test = draw_shots(split, k=4, seed=seed)
            test = test[:: max(1, len(test) // cells)][:cells] if cells else test
            references = inspector.fit([shrunk(path, side) for path in refs])
            found = list(inspector.inspect_many([shrunk(s.path, side) for s in test], references))
            labels = np.array([s.label for s in test])
            scores = np.array([i.score for i in found])
            flagged = np.array([i.is_anomalous for i in found])
            warned = np.array([i.reference_fit is not None and not i.reference_fit["fits"] for i in found])
            rows.append(
                {
                    "type": cell_type,
                    "seed": seed,
                    "auroc": float(roc_auc_score(labels, scores)),
                    "false_alarms": float(flagged[labels == 0].mean()),
                    "recall": float(flagged[labels == 1].mean()),
                    "warned_good": float(warned[labels == 0].mean()),
                    "n": len(test),
                }
            )
    mean = {key: float(np.mean([r[key] for r in rows])) for key in ("auroc", "false_alarms", "recall", "warned_good")}
    return {"side": side, "rows": rows, "mean": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half", choices=("dev", "test"), default="dev")
    parser.add_argument("--sides", default="300,160,96,64,48,32,24,16")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--cells", type=int, default=None, help="N test cells per type, evenly spaced (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict[str, Any] = {"half": args.half, "seeds": seeds, "machine": platform.platform(), "sides": []}
    for side in [int(s) for s in args.sides.split(",")]:
        start = time.perf_counter()
        found = run_side(side, args.half, seeds, args.cells)
        found["seconds"] = round(time.perf_counter() - start, 1)
        result["sides"].append(found)
        write_json_atomic(args.out, result)
        m = found["mean"]
        print(
            f"{side:4d} px: AUROC {m['auroc']:.3f}, false alarms {m['false_alarms']:.1%}, recall {m['recall']:.1%}, "
            f"good warned {m['warned_good']:.1%} ({found['seconds']} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
