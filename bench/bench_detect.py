"""`anomalygpt detect` end to end, the job as a user runs it (issue 22): PNG files in, and with `--out` every image's
record, map and overlay figure written (and, in this tree, with `--maps flagged`: the maps and overlays of flagged
images only); images/s and bytes written, this tree against another commit's, same files, same machine.

Each tree runs in its own process (`PYTHONPATH` = that tree): the CLI's own parser and `prepare_detect` (the profile
or references loaded, every file checked: not timed), then `inspect_all` timed. Rounds alternate the trees, so load
from other processes falls on both; medians. Then the outputs are compared: every record (but its timings), every
map and every overlay's pixels must be the same in both trees, or the bench fails.

Cells: the exported ELPV test-half mono cells and the 4 development-half references that `bench/gpu_check.sh
prepare` writes under runs/gpu_carry/elpv (`bench/bench_batch.py --export-cells DIR` writes them alone).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_detect.py --base 75fb5fd --n 200 --rounds 3 \\
        --out runs/bench_detect.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from bench_batch import test_files
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CELLS = ROOT / "runs" / "gpu_carry" / "elpv"

# Modes: "out" (--out: every map and overlay), "flagged" (--maps flagged), "processes" (--out --processes N), "no_out"
# Run in the tree's own process: argv = [queries folder, references folder, out folder or "-", extra options...]
HARNESS = r"""
import json, sys, time
from anomalygpt import cli
queries, refs, out, *extra = sys.argv[1:]
args = ["detect", queries, *extra, "--ref", refs] + ([] if out == "-" else ["--out", out])
parsed = cli.build_parser().parse_args(args)
options = cli.detect_options(parsed)
job = cli.prepare_detect(options)
start = time.perf_counter()
records = cli.inspect_all(job, options)
seconds = time.perf_counter() - start
print(json.dumps({"images": len(records), "seconds": seconds}))
"""


def run_tree(tree: Path, queries: Path, refs: Path, out: Path | None, extra: list[str]) -> dict[str, float]:
    """One timed inspect_all of `tree`'s code over the queries; the bytes written under `out`."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", HARNESS, str(queries), str(refs), "-" if out is None else str(out), *extra]
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: detect failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    written = 0 if out is None else sum(path.stat().st_size for path in out.iterdir())
    return {"images_per_s": figures["images"] / figures["seconds"], "seconds": figures["seconds"], "bytes": written}


def same_outputs(ours: Path, theirs: Path) -> dict[str, int]:
    """Files compared, and those differing (records but their timings, maps, overlays' pixels)."""
    names = sorted(path.name for path in ours.iterdir())
    if names != sorted(path.name for path in theirs.iterdir()):
        raise RuntimeError(f"{ours} and {theirs} hold different files")
    differing = 0
    for name in names:
        a, b = ours / name, theirs / name
        if name == "summary.json":
            continue
        if name.endswith(".json"):
            left, right = (json.loads(path.read_text()) for path in (a, b))
            left.pop("timings_ms"), right.pop("timings_ms")
            differing += left != right
        elif name.endswith(".npy"):
            differing += not np.array_equal(np.load(a), np.load(b))
        else:
            with Image.open(a) as left_image, Image.open(b) as right_image:
                differing += not np.array_equal(np.asarray(left_image), np.asarray(right_image))
    return {"files": len(names) - 1, "differing": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a commit to compare against (checked out with git worktree)")
    parser.add_argument("--cells", type=Path, default=CELLS, help="folder with test/ and refs/ (gpu_check prepare)")
    parser.add_argument("--refs", type=Path, help="good references (default: --cells' refs/, 4 development cells)")
    parser.add_argument("--n", type=int, default=200, help="query files (copies of test/'s cells, cycled)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="detect's --device")
    parser.add_argument("--processes", type=int, default=0, help="also time this tree's --out with --processes N")
    parser.add_argument("--out", type=Path, required=True, help="the JSON figures")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_detect_"))
    queries = work / "queries"
    queries.mkdir()
    test_files(queries, sorted((args.cells / "test").glob("*.png")), args.n)
    trees = {"this": ROOT}
    if args.base:
        base = work / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True)
        trees["base"] = base
    extra = ["--device", args.device]
    ours = ("out", "flagged", "no_out") + (("processes",) if args.processes else ())
    modes = {name: ours if name == "this" else ("out", "no_out") for name in trees}
    rates: dict[str, dict[str, list[float]]] = {name: {mode: [] for mode in modes[name]} for name in trees}
    megabytes: dict[str, dict[str, float]] = {name: {} for name in trees}
    try:
        for index in range(args.rounds):
            for name, tree in trees.items() if index % 2 == 0 else reversed(trees.items()):
                for mode in modes[name]:
                    out = None if mode == "no_out" else work / f"{mode}_{name}"
                    options = extra + {
                        "flagged": ["--maps", "flagged"],
                        "processes": ["--processes", str(args.processes)],
                    }.get(mode, [])
                    figures = run_tree(tree, queries, args.refs or args.cells / "refs", out, options)
                    rates[name][mode].append(round(figures["images_per_s"], 2))
                    megabytes[name][mode] = round(figures["bytes"] / 1e6, 1)
                    print(f"round {index} {name} {mode}: {figures['images_per_s']:.1f} images/s", flush=True)
        result: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "n": len(list(queries.iterdir())),
            "references": len(list((args.refs or args.cells / "refs").iterdir())),
            "device": args.device,
            "processes": args.processes,
            "images_per_s": rates,
            "median_images_per_s": {
                name: {mode: statistics.median(values) for mode, values in by_mode.items()}
                for name, by_mode in rates.items()
            },
            "megabytes_written": megabytes,
        }
        if "base" in trees:
            result["outputs_vs_base"] = same_outputs(work / "out_this", work / "out_base")
            if result["outputs_vs_base"]["differing"]:
                raise RuntimeError(f"outputs differ from the base commit's: {result['outputs_vs_base']}")
    finally:
        if "base" in trees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["base"])], check=False)
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_images_per_s"]), result.get("outputs_vs_base", ""))


if __name__ == "__main__":
    main()
