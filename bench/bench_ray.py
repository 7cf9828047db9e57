"""`detect --engine ray` against the single-process path (issue 22): wall time and throughput on this machine.

A profile is fitted on 4 good mono cells of ELPV's development half (odd-numbered); the queries are the first N
mono cells of the test half (even-numbered, good and defective), read as the package's PNG files. Each engine runs
as a user runs it, `anomalygpt detect --profile P CELLS... --out DIR` in a fresh process, so the times include
imports, model loading and (for Ray) starting a local instance and its actors. Then the Ray run is repeated on the
same --out (every record reused: the cost of resuming a finished job), and the records of both engines compared.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_ray.py --n 200 --out runs/bench_ray
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from anomalygpt.io import write_json_atomic
from eval.datasets import elpv_half, load_split

N_REFERENCES = 4


def cells(n: int) -> tuple[list[Path], list[Path]]:
    """4 good dev-half mono references, and the first n test-half mono cells (good and defective) as queries."""
    dev = elpv_half(load_split("elpv", None, "mono"), "dev")
    test = elpv_half(load_split("elpv", None, "mono"), "test")
    queries = sorted({*test.reference_pool, *(sample.path for sample in test.test)})[:n]
    return sorted(dev.reference_pool)[:N_REFERENCES], queries


def anomalygpt(*args: str | Path) -> float:
    """Run the CLI in a fresh process; its wall time in seconds (a failure stops the bench)."""
    command = [sys.executable, "-c", "import sys; from anomalygpt.cli import main; sys.exit(main(sys.argv[1:]))"]
    start = time.perf_counter()
    done = subprocess.run([*command, *map(str, args)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench_ray: {' '.join(map(str, args[:2]))} failed: {done.stderr.strip()[-2000:]}")
    return seconds


def compare(local: Path, ray: Path) -> dict[str, float | int]:
    """Largest score difference and verdict disagreements between the engines' records."""
    found = {path.name: json.loads(path.read_text()) for path in ray.glob("cell*.json")}
    expected = {path.name: json.loads(path.read_text()) for path in local.glob("cell*.json")}
    assert found.keys() == expected.keys(), "the engines wrote different records"
    gaps = [abs(found[name]["score"] - expected[name]["score"]) for name in expected]
    verdicts = sum(found[name]["verdict"] != expected[name]["verdict"] for name in expected)
    return {"records": len(expected), "max_score_difference": max(gaps), "verdicts_differing": verdicts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="query cells (default 200)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    references, queries = cells(args.n)
    profile = args.out / "mono.profile"
    fit_seconds = anomalygpt("fit", *references, "--out", profile, "--class-name", "solar cell", "--overwrite")
    runs = {  # name: (--out folder, options)
        "local": ("local", ["--overwrite"]),
        "ray (2 actors x 1 CPU)": ("ray", ["--engine", "ray", "--overwrite"]),
        "ray (1 actor x 2 CPUs)": ("ray1", ["--engine", "ray", "--ray-actors", "1", "--ray-cpus", "2", "--overwrite"]),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (folder, options) in runs.items():
        out = args.out / folder
        seconds = anomalygpt("detect", *queries, "--profile", profile, "--out", out, *options)
        results[name] = {"seconds": seconds, "images_per_second": len(queries) / seconds}
        print(f"{name}: {seconds:.1f} s, {len(queries) / seconds:.2f} images/s", flush=True)
    resume = anomalygpt("detect", *queries, "--profile", profile, "--out", args.out / "ray", "--engine", "ray")
    results["ray, re-run on the finished --out (all reused)"] = {"seconds": resume}
    print(f"ray re-run, all reused: {resume:.1f} s")
    agreement = {name: compare(args.out / "local", args.out / folder) for name, (folder, _) in runs.items()}
    print(f"records against the local run's: {agreement}")
    document = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average_1min_at_end": os.getloadavg()[0],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "n_queries": len(queries),
        "n_references": len(references),
        "fit_seconds": fit_seconds,
        "runs": results,
        "agreement": agreement,
        "speed_ray_over_local": float(
            np.round(results["ray (2 actors x 1 CPU)"]["images_per_second"] / results["local"]["images_per_second"], 3)
        ),
    }
    write_json_atomic(args.out / "bench_ray.json", document)
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
