"""What find_regions costs on real anomaly maps, and that regions.h_maxima changes none of them (issue 22).

The maps: --cells cells of one ELPV half (--half dev for choices; both types by default), inspected 4-shot against
4 good cells of the same half (seed 0); every find_regions call the inspections make (the anomalous ones) is
recorded with its arguments. Each call is then repeated --rounds times, alternating: with the library's
regions.h_maxima, and with skimage.morphology.h_maxima in its place (the reference it must equal); reported per
cell type: calls, regions, median ms per call of each, and whether every region (every field) is the same.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_region_speed.py --half dev --out runs/bench_region_speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from skimage import morphology

from anomalygpt import regions, verdict
from anomalygpt.inspection import build_inspector
from anomalygpt.io import write_json_atomic
from eval.datasets import draw_shots, elpv_half, load_split

Call = tuple[tuple[Any, ...], dict[str, Any]]


def recorded_calls(cell_type: str, half: str, cells: int) -> list[Call]:
    """The find_regions calls of 4-shot inspections of the half's first `cells` test cells."""
    split = elpv_half(load_split("elpv", None, cell_type), half)
    refs, _ = draw_shots(split, k=4, seed=0)
    inspector = build_inspector()
    references = inspector.fit(refs)
    calls: list[Call] = []
    library = verdict.find_regions

    def spy(*args: Any, **kwargs: Any) -> list[regions.Region]:
        calls.append((args, kwargs))
        return library(*args, **kwargs)

    verdict.find_regions = spy  # type: ignore[assignment]
    try:
        for sample in split.test[:cells]:
            inspector.inspect(sample.path, references)
    finally:
        verdict.find_regions = library  # type: ignore[assignment]
    return calls


def timed(calls: list[Call]) -> tuple[float, list[list[regions.Region]]]:
    """One pass over the calls: ms per call, and the regions."""
    start = time.perf_counter()
    found = [regions.find_regions(*args, **kwargs) for args, kwargs in calls]
    return (time.perf_counter() - start) * 1000 / max(1, len(calls)), found


def skimage_h_maxima(image: np.ndarray, h: float, within: np.ndarray | None = None) -> np.ndarray:
    """The reference: skimage's h-maxima (of the pixels `within`, as split_at_peaks asks the library's)."""
    found = morphology.h_maxima(image, h)
    return found if within is None else found * within


def compare(calls: list[Call], rounds: int) -> dict[str, Any]:
    library = regions.h_maxima
    ms: dict[str, list[float]] = {"library": [], "skimage": []}
    found: dict[str, list[list[regions.Region]]] = {}
    try:
        for _ in range(rounds):
            for name, function in (("skimage", skimage_h_maxima), ("library", library)):
                regions.h_maxima = function
                took, found[name] = timed(calls)
                ms[name].append(took)
    finally:
        regions.h_maxima = library
    return {
        "calls": len(calls),
        "regions": sum(map(len, found["library"])),
        "ms_per_call_skimage": float(np.median(ms["skimage"])),
        "ms_per_call_library": float(np.median(ms["library"])),
        "rounds_ms": ms,
        "identical": found["library"] == found["skimage"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half", choices=("dev", "test"), default="dev")
    parser.add_argument("--types", default="mono,poly")
    parser.add_argument("--cells", type=int, default=300, help="test cells of the half per type (the first N)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_region_speed.json"))
    args = parser.parse_args()
    out: dict[str, Any] = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "half": args.half,
        "load_average_before": os.getloadavg(),
    }
    for cell_type in args.types.split(","):
        out[cell_type] = compare(recorded_calls(cell_type, args.half, args.cells), args.rounds)
        row = out[cell_type]
        print(
            f"{cell_type}: {row['calls']} calls, {row['regions']} regions; skimage {row['ms_per_call_skimage']:.1f} "
            f"ms per call, library {row['ms_per_call_library']:.1f}; identical {row['identical']}",
            flush=True,
        )
    out["load_average_after"] = os.getloadavg()
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
