"""Batched passes vs one image at a time, where the service runs them: in one worker thread (issue 21).

The same 16 dev-half ELPV mono cells against a profile of 4 dev-half good cells (as bench_service.py), inspected
image by image (`Inspector.inspect`) and by `Inspector.inspect_many` with batch sizes 1, 4, 8 and 16, in turns,
`--rounds` times, all inside one ThreadPoolExecutor thread as `anomalygpt serve` runs them; then the same in the
main thread, as the CLI runs them.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_service_batch.py --out runs/bench_service_batch.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench_service import bench_images

from anomalygpt.inspection import Inspector, References, build_inspector
from anomalygpt.io import load_image, write_json_atomic

WAYS = ("image by image", 1, 4, 8, 16)  # inspect per image, then inspect_many batch sizes


def timings(inspector: Inspector, profile: References, images: list[Any], rounds: int) -> dict[str, list[float]]:
    """Seconds per 16 images, per way, the ways taking turns each round; the scores must agree."""
    seconds: dict[str, list[float]] = {str(way): [] for way in WAYS}
    expected = [inspection.score for inspection in (inspector.inspect(image, profile) for image in images)]
    for _ in range(rounds):
        for way in WAYS:
            started = time.perf_counter()
            if way == "image by image":
                found = [inspector.inspect(image, profile) for image in images]
            else:
                found = list(inspector.inspect_many(images, profile, batch_size=int(way)))
            seconds[str(way)].append(round(time.perf_counter() - started, 2))
            if [inspection.score for inspection in found] != expected:
                raise RuntimeError(f"{way}: scores differ from image-by-image inspection")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_service_batch.json"))
    args = parser.parse_args()
    machine = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(machine, flush=True)
    references, queries = bench_images()
    inspector = build_inspector("default")
    images = [load_image(path) for path in queries[:16]]
    with ThreadPoolExecutor(1) as worker:
        profile = worker.submit(inspector.fit, [load_image(path) for path in references]).result()
        in_worker = worker.submit(timings, inspector, profile, images, args.rounds).result()
    in_main = timings(inspector, profile, images, args.rounds)
    for where, found in (("worker thread", in_worker), ("main thread", in_main)):
        for way, seconds in found.items():
            print(f"{where}, {way}: {seconds} s per 16 images", flush=True)
    report = {
        "machine": machine,
        "command": " ".join([sys.executable, *sys.argv]),
        "worker_thread_s": in_worker,
        "main_thread_s": in_main,
        "finished": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    }
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
