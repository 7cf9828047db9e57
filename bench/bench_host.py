"""The host's ceiling on the device path (issue 22): how many images/s `inspect_many` can finish when the device's
share (backbone, nearest-patch search, smoothing, top-k score) takes no time at all.

On a GPU the device returns a batch's maps in a few milliseconds, and what is left is the host's: decoding the
PNG files, moving each image to wherever its tail runs (reference fit, verdict, regions) and back, and the tail.
This bench makes the device path's outputs once (the Inspector's device path forced on this CPU: maps smoothed and
scored by torch, as a GPU's), then replays them: `batch_maps` hands back the stored batch instantly, so
`inspect_many` runs everything else as it would beside an infinitely fast device. For threads and for each
--processes it reports images/s, and the CPU milliseconds per image of the calling process (every thread of it:
with worker processes, what feeds them and gathers their results; 1000 / that is a ceiling no number of cores
lifts) and of the worker processes. Records are checked equal to the threads' run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_host.py --n 473 --processes 1,2 --out runs/bench_host.json
    .venv/bin/python bench/bench_host.py --cells runs/gpu_carry/elpv --n 2000 --processes 4,8,16  # a 16-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_batch import parity, reference_files, test_cells, test_files

from anomalygpt import inspection
from anomalygpt.config import load_preset
from anomalygpt.inspection import Inspection, Inspector, References, build_inspector
from anomalygpt.io import write_json_atomic
from anomalygpt.memory import PatchMemory

Outputs = tuple[np.ndarray, list[float | None], torch.Tensor]
KEYS = ("images_per_s", "caller_cpu_ms_per_image", "workers_cpu_ms_per_image")


class Replay:
    """Inspector.batch_maps for one pass over the files in order: each call returns the next stored batch."""

    def __init__(self, maps: np.ndarray, scores: list[float | None], looks: torch.Tensor) -> None:
        self.maps, self.scores, self.looks, self.at = maps, scores, looks, 0

    def __call__(self, inputs: Sequence[np.ndarray], memory: PatchMemory, half: bool) -> Outputs:
        span = slice(self.at, self.at + len(inputs))
        self.at = span.stop
        return self.maps[span], self.scores[span], self.looks[span]


def device_outputs(inspector: Inspector, references: References, files: list[Path], batch_size: int) -> Outputs:
    """The device path's maps, scores and appearances of every file, made once (on this CPU)."""
    inspector.device_path = True
    parts = []
    for first in range(0, len(files), batch_size):
        decoded = [inspection.decoded(p, str(p), references.memory.cfg) for p in files[first : first + batch_size]]
        parts.append(inspector.batch_maps([d.memory_input for d in decoded], references.memory, False))
    maps = np.concatenate([p[0] for p in parts])
    return maps, [s for p in parts for s in p[1]], torch.cat([p[2] for p in parts])


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def replayed(
    inspector: Inspector, references: References, files: list[Path], outputs: Outputs, batch: int, processes: int
) -> tuple[dict[str, float], list[Inspection]]:
    """One replayed pass: images/s, the caller's and the workers' CPU ms per image; the records."""
    inspector.batch_maps = Replay(*outputs)  # type: ignore[method-assign]
    start, cpu, children = time.perf_counter(), time.process_time(), children_cpu_s()
    sources = [str(path) for path in files]
    results = list(inspector.inspect_many(files, references, sources=sources, batch_size=batch, processes=processes))
    wall = time.perf_counter() - start
    del inspector.batch_maps
    figures = {
        "images_per_s": len(files) / wall,
        "caller_cpu_ms_per_image": (time.process_time() - cpu) * 1000 / len(files),
        "workers_cpu_ms_per_image": (children_cpu_s() - children) * 1000 / len(files),  # pools end with the call
    }
    return figures, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=473, help="test files (cycled over the test half's cells)")
    parser.add_argument("--processes", type=lambda t: [int(v) for v in t.split(",")], default=[os.cpu_count() or 1])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (median reported)")
    parser.add_argument("--cell-type", default="mono", choices=("mono", "poly"))
    parser.add_argument("--seed", type=int, default=0, help="reference draw")
    parser.add_argument("--cells", type=Path, default=None, help="a folder bench_batch --export-cells wrote")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the figures")
    args = parser.parse_args()
    load = os.getloadavg()
    if args.cells is not None:
        cells, refs = sorted((args.cells / "test").glob("*.png")), sorted((args.cells / "refs").glob("*.png"))
    else:
        cells, refs = test_cells(args.cell_type), reference_files(args.cell_type, args.seed)
    inspector = build_inspector(load_preset("default"))
    references = inspector.fit(refs)
    settings = [0, *args.processes]
    rounds: list[dict[str, dict[str, float]]] = []  # per round: setting -> figures
    figures: dict[str, Any] = {
        "setup": {
            "n_files": args.n,
            "batch_size": args.batch_size,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load,
        }
    }

    def save() -> None:  # after every replay: a run stopped by its time limit keeps what it measured
        figures["rounds"] = rounds
        names = {name for rates in rounds for name in rates}
        figures["median"] = {
            name: {key: float(np.median([r[name][key] for r in rounds if name in r])) for key in KEYS}
            for name in sorted(names)
        }
        figures["setup"]["load_average_after"] = os.getloadavg()
        if args.out is not None:
            write_json_atomic(args.out, figures)

    with tempfile.TemporaryDirectory(prefix="bench-host-") as folder:
        files = test_files(Path(folder), cells, args.n)
        outputs = device_outputs(inspector, references, files, args.batch_size)
        baseline: list[Inspection] = []
        for index in range(args.rounds):
            rounds.append({})
            for processes in settings:
                name = f"{processes}_processes" if processes else "threads"
                rounds[-1][name], results = replayed(inspector, references, files, outputs, args.batch_size, processes)
                if not baseline:
                    baseline = results
                    figures["anomalous"] = sum(r.is_anomalous for r in results)
                elif index == 0:
                    differing = parity(results, baseline)
                    if differing["verdicts_differing"] or differing["region_boxes_differing"]:
                        raise RuntimeError(f"{name} differs from threads: {differing}")
                    if differing["max_score_difference"]:
                        raise RuntimeError(f"{name} scores differ from threads': {differing}")
                save()
                print(
                    f"round {index} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1][name].items()),
                    flush=True,
                )
    print(json.dumps(figures["median"], indent=1))


if __name__ == "__main__":
    main()
