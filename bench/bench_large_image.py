"""Huge images end to end: `anomalygpt detect` on one query and 3 references of each side, with and without the
working-size cap (anomalygpt/verdict.py MAX_WORKING_SIDE), in a fresh process each: wall time, peak memory
(the process's maximum resident set) and the size of the map the inspection keeps.

The images are odd-numbered (dev half) ELPV cells upscaled to the side (bicubic), the query a defective one.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_large_image.py --sides 300,2048,6000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from anomalygpt.io import load_image, write_json_atomic
from eval.datasets import elpv_half, load_split

CHILD = """
import sys
import anomalygpt.verdict as verdict
verdict.MAX_WORKING_SIDE = int(sys.argv[1])
from anomalygpt.cli import main
sys.exit(main(sys.argv[2:]))
"""


def upscaled(path: Path, side: int, out: Path) -> Path:
    image = load_image(path)
    interpolation = cv2.INTER_CUBIC if side > image.shape[0] else cv2.INTER_AREA
    resized = cv2.resize(image, (side, side), interpolation=interpolation)
    target = out / f"{path.stem}_{side}.png"
    cv2.imwrite(str(target), cv2.cvtColor(resized, cv2.COLOR_RGB2BGR))
    return target


def run(query: Path, refs: list[Path], cap: int, out: Path) -> dict:
    """One detect in a fresh process: seconds, peak resident MB, the map's MB, the inspected size."""
    command = [sys.executable, "-c", CHILD, str(cap), "detect", str(query), "--ref", *map(str, refs)]
    command += ["--out", str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    stderr = child.stderr.read() if child.stderr else ""
    if status != 0:
        raise SystemExit(f"detect failed ({status}): {stderr.strip().splitlines()[-1:]}")
    files = json.loads((out / "summary.json").read_text())["images"][0]["files"]
    inspection = json.loads((out / files["inspection"]).read_text())
    return {
        "seconds": seconds,
        "peak_mb": usage.ru_maxrss / 1024,
        "map_mb": (out / files["anomaly_map"]).stat().st_size / 2**20,
        "inspected_size": inspection["image_size"],
        "verdict": inspection["verdict"] if "verdict" in inspection else inspection.get("is_anomalous"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="300,2048,6000")
    parser.add_argument("--uncapped", default="2048,6000", help="sides also run without the cap")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_large_image.json"))
    args = parser.parse_args()
    split = elpv_half(load_split("elpv", None, "mono"), "dev")
    goods = sorted(split.reference_pool)[:3]
    query = next(s.path for s in split.test if s.label == 1)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for side in map(int, args.sides.split(",")):
            images = folder / str(side)
            images.mkdir()
            refs = [upscaled(p, side, images) for p in goods]
            q = upscaled(query, side, images)
            caps = [("capped", 2048)] + ([("uncapped", 10**9)] if str(side) in args.uncapped.split(",") else [])
            for label, cap in caps:
                row = run(q, refs, cap, folder / f"out_{side}_{label}")
                rows[f"{side} px, {label}"] = row
                print(
                    f"{side} x {side}, {label}: {row['seconds']:.1f} s, peak {row['peak_mb']:.0f} MB, "
                    f"map {row['map_mb'] or 0:.1f} MB, inspected at {row['inspected_size']}",
                    flush=True,
                )
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    write_json_atomic(args.out, {"machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
