"""Batched inspection (issue 22): Inspector.inspect_many against Inspector.inspect one image at a time.

End to end from PNG files: --n cells of ELPV's test half (even-numbered; --cell-type, good and defective as they
come, cycled when --n is larger) are copied to a temporary folder, 4 references are drawn from the development half
(odd-numbered) of the same type, and both paths inspect the files: `inspect` in a loop over --single of them, and
`inspect_many` over all of them at each --batch-sizes. Reported: images/s, the batched/one-at-a-time ratio, and
parity (largest score difference, verdicts, region counts and boxes that differ) on the files both paths saw. The
temporary copies are removed at the end (ELPV's licence: never copied into the repository).

With --device cuda (bench/gpu_check.sh runs this on a GPU machine) it also measures, on the same files: the GPU
path in float32 and with half=True (float16 autocast and search) at each batch size, the effect of half precision
on scores and verdicts, the largest score difference between the GPU and the CPU, and the same machine's CPU
throughput with every core (--cpu-threads, default all) for the ratio the issue asks (>= 20x), and how many
images/s the per-image tail (reference fit, verdict, regions: CPU work) sustains alone in 1 and in --cpu-threads
threads on --tail-n files, which bounds the device path. These figures go under "device_path" in the JSON.

With --rehearse the same GPU measurements run on this CPU (the Inspector's device path forced: a backbone pass per
batch, float16 autocast and search with half=True, maps smoothed and scored by torch): bench/gpu_check.sh rehearse
uses it to try the GPU script end to end before device time is spent, and its half_vs_float32 is half precision's
effect on verdicts with the CPU's float16 kernels (a GPU's round differently; gpu_check measures those).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_batch.py --out runs/bench_batch.json
    .venv/bin/python bench/bench_batch.py --device cuda --n 4000 --out $OUT/bench_batch_cuda.json
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_batch.py --rehearse --n 400 --out runs/bench_batch_rehearse.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalygpt import inspection
from anomalygpt.config import load_preset
from anomalygpt.devices import with_device
from anomalygpt.inspection import Inspection, Inspector, References, build_inspector
from anomalygpt.io import load_image, write_json_atomic
from anomalygpt.shared_batch import SharedBatches
from eval.datasets import draw_shots, elpv_half, load_split


def test_cells(cell_type: str) -> list[Path]:
    """The test half's cells of the type, good ones first (ELPV package)."""
    split = elpv_half(load_split("elpv", None, cell_type), "test")
    tested = {sample.path for sample in split.test}
    return [p for p in sorted(split.reference_pool) if p not in tested] + [s.path for s in split.test]


def export_cells(folder: Path, cell_type: str, n: int, seed: int) -> None:
    """n test-half cells (an even spread of them) and the 4 references, as the GPU machine's carried input: it
    has no ELPV package. Never commit the folder (ELPV's licence): bench/gpu_check.sh prepare writes it under
    runs/, which git ignores."""
    cells = test_cells(cell_type)
    picked = [cells[i] for i in np.linspace(0, len(cells) - 1, min(n, len(cells))).round().astype(int)]
    for name, paths in (("test", picked), ("refs", reference_files(cell_type, seed))):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copyfile(path, folder / name / path.name)


def test_files(folder: Path, cells: list[Path], n: int) -> list[Path]:
    """n PNG copies of the cells (cycled), named in order."""
    files = []
    for index in range(n):
        files.append(folder / f"cell{index:05d}.png")
        shutil.copyfile(cells[index % len(cells)], files[-1])
    return files


def reference_files(cell_type: str, seed: int) -> list[Path]:
    """4 good references from the development half."""
    refs, _ = draw_shots(elpv_half(load_split("elpv", None, cell_type), "dev"), k=4, seed=seed)
    return refs


def one_at_a_time(
    inspector: Inspector, references: References, files: list[Path]
) -> tuple[float, list[Inspection], float]:
    """Images/s of Inspector.inspect in a loop (decode included), after one warm-up image; the results; the
    process CPU time per image (ms, every thread)."""
    inspector.inspect(files[0], references)
    start, cpu = time.perf_counter(), time.process_time()
    results = [inspector.inspect(path, references, source=str(path)) for path in files]
    cpu_ms = (time.process_time() - cpu) * 1000 / len(files)
    return len(files) / (time.perf_counter() - start), results, cpu_ms


def batched(
    inspector: Inspector,
    references: References,
    files: list[Path],
    batch_size: int,
    half: bool = False,
    processes: int = 0,
) -> tuple[float, list[Inspection], float]:
    """Images/s of inspect_many over every file, after a warm-up batch; the results; CPU ms per image (of this
    process: with worker processes, theirs is not counted)."""
    list(inspector.inspect_many(files[:batch_size], references, batch_size=batch_size, half=half))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    sources = [str(path) for path in files]
    many = inspector.inspect_many(
        files, references, sources=sources, batch_size=batch_size, half=half, processes=processes
    )
    results = list(many)
    cpu_ms = (time.process_time() - cpu) * 1000 / len(files)
    return len(files) / (time.perf_counter() - start), results, cpu_ms


def parity(ours: list[Inspection], theirs: list[Inspection]) -> dict[str, Any]:
    """How two runs over the same files differ: score, verdicts, region counts and boxes (how far each box of the
    images with as many regions in both moved: its largest coordinate change in pixels)."""
    pairs = list(zip(ours, theirs, strict=False))
    same_count = [(a, b) for a, b in pairs if len(a.regions) == len(b.regions)]
    shifts = [
        max(abs(p - q) for p, q in zip(r.box, s.box, strict=True))
        for a, b in same_count
        for r, s in zip(a.regions, b.regions, strict=True)
    ]
    return {
        "compared": len(pairs),
        "max_score_difference": max(abs(a.score - b.score) for a, b in pairs),
        "verdicts_differing": sum(a.is_anomalous != b.is_anomalous for a, b in pairs),
        "region_counts_differing": len(pairs) - len(same_count),
        "region_boxes_differing": sum([r.box for r in a.regions] != [r.box for r in b.regions] for a, b in pairs),
        "box_shift_px_median_p95_max": [float(np.percentile(shifts, q)) if shifts else 0.0 for q in (50, 95, 100)],
        "anomalous": sum(b.is_anomalous for _, b in pairs),
    }


def decode_figures(files: list[Path], workers: int) -> dict[str, float]:
    """Images/s of load_image over the files: in the caller, in `workers` threads, in `workers` processes."""
    rates = {}
    for name, pool in (("threads", ThreadPoolExecutor(workers)), ("processes", ProcessPoolExecutor(workers))):
        with pool:
            list(pool.map(load_image, files[:workers]))  # started and warm
            start = time.perf_counter()
            list(pool.map(load_image, files, chunksize=4))
            rates[f"{workers}_{name}"] = len(files) / (time.perf_counter() - start)
    start = time.perf_counter()
    for path in files:
        load_image(path)
    rates["caller"] = len(files) / (time.perf_counter() - start)
    return rates


def tail_figures(inspector: Inspector, references: References, files: list[Path], threads: int) -> dict[str, float]:
    """Images/s of the per-image tail of inspect_many alone (reference fit, verdict, regions: CPU work however fast
    the device is), in one thread, in `threads` threads (as inspect_many runs it) and in `threads` processes (what
    the GIL costs the threads), on maps the device made beforehand: a ceiling on the device path's images/s.
    Regions of defective images cost most of it (splitting large components at their peaks)."""
    images = [inspection.decoded(path, str(path), references.memory.cfg) for path in files]
    maps, scores, looks = inspector.batch_maps([d.memory_input for d in images], references.memory, False)
    items = [(image, None, maps[i], scores[i], looks[i], {}) for i, image in enumerate(images)]
    finisher = inspection.Finisher.of(inspector, references, None, 0.0)
    rates = {}
    for n in (1, threads):
        with ThreadPoolExecutor(n) as pool:
            start = time.perf_counter()
            threaded = list(pool.map(lambda item: finisher(*item), items))
            rates[f"{n}_threads"] = len(images) / (time.perf_counter() - start)
    # As inspect_many(processes=threads) runs them: pixels and maps in a shared batch, chunks of images per task.
    with SharedBatches(len(images), references.memory.image_size) as batches:
        shared = batches.new()
        pixels, _, stored_maps = shared.arrays()
        pixels[:], stored_maps[:] = [image.pixels for image in images], maps
        stored = [image.stored() for image in images]
        with inspection.worker_pool(finisher, threads) as pool:
            list(pool.map(time.sleep, [1.0] * threads))  # every process started (one per task held) before timing
            start = time.perf_counter()
            chunks = [
                pool.submit(
                    inspection.finish_in_worker,
                    shared,
                    a,
                    stored[a:b],
                    [None] * (b - a),
                    scores[a:b],
                    looks[a:b].numpy(),
                    {},
                )
                for a, b in inspection.chunks(len(images), inspection.WORKER_CHUNK)
            ]
            found = [record for chunk in chunks for record in chunk.result()]
            rates[f"{threads}_processes"] = len(images) / (time.perf_counter() - start)
    differing = parity(found, threaded)
    if differing["verdicts_differing"] or differing["region_boxes_differing"] or differing["max_score_difference"]:
        raise RuntimeError(f"the tail in processes differs from the tail in threads: {differing}")
    return rates


def inspector_on(device: str, threads: int) -> Inspector:
    torch.set_num_threads(threads)
    return build_inspector(with_device(load_preset("default"), device))


def cpu_figures(args: argparse.Namespace, files: list[Path], refs: list[Path]) -> dict[str, Any]:
    """One-at-a-time against batched on the CPU, in alternating rounds (so that load from other processes falls
    on both alike), with parity from the first round."""
    inspector = inspector_on("cpu", args.cpu_threads)
    references = inspector.fit(refs)
    batch_files = files[: args.cpu_n or len(files)]
    rounds: list[dict[str, float]] = []
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "rounds": rounds}
    for index in range(args.rounds):
        rates: dict[str, float] = {}
        single_rate, single, rates["one_at_a_time_cpu_ms"] = one_at_a_time(inspector, references, files[: args.single])
        rates["one_at_a_time"] = single_rate
        for size, name in batch_settings(args):
            rates[name], results, rates[f"{name}_cpu_ms"] = batched(inspector, references, batch_files, size)
            if index == 0:
                out[f"parity_{name}_vs_one_at_a_time"] = parity(results, single)
                out.setdefault("scores_one_at_a_time", [r.score for r in single])
                out.setdefault("verdicts", [r.is_anomalous for r in single])
        rounds.append(rates)
        print(
            f"cpu round {index} (images/s; process CPU ms/image): "
            + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()),
            flush=True,
        )
    for key in rounds[0]:
        if key.endswith("_cpu_ms"):
            out[f"{key}_per_image"] = float(np.median([r[key] for r in rounds]))
            continue
        out[f"{key}_images_per_s"] = float(np.median([r[key] for r in rounds]))
    names = [name for _, name in batch_settings(args)]
    ratios = {name: float(np.median([r[name] / r["one_at_a_time"] for r in rounds])) for name in names}
    out["batched_vs_one_at_a_time"] = ratios
    out["best_batched"] = max(ratios, key=lambda name: ratios[name])
    out["best_batched_images_per_s"] = out[f"{out['best_batched']}_images_per_s"]
    out["one_at_a_time_ms_per_image"] = 1000 / out["one_at_a_time_images_per_s"]
    return out


def batch_settings(args: argparse.Namespace) -> Iterator[tuple[int, str]]:
    """(batch size, name) of each batched CPU run, setting the CPU backbone pass size as it goes (--cpu-passes;
    default: the library's)."""
    default = inspection.CPU_PASS
    for size in args.batch_sizes:
        for cpu_pass in args.cpu_passes or [default]:
            inspection.CPU_PASS = cpu_pass
            yield size, f"batch_{size}" + (f"_pass_{cpu_pass}" if args.cpu_passes else "")
    inspection.CPU_PASS = default


def device_figures(
    args: argparse.Namespace, files: list[Path], refs: list[Path], cpu: dict[str, Any], out: dict[str, Any], save: Save
) -> None:
    """The GPU path in float32 and half precision (on the CPU with --rehearse), against this machine's CPU figures,
    into `out`; saved after each step, so that a run stopped by its time limit still reports what it measured."""
    inspector = inspector_on("cpu" if args.rehearse else args.device, args.cpu_threads)
    if args.rehearse:
        inspector.device_path = True
    start = time.perf_counter()
    references = inspector.fit(refs)
    out["device"] = "the CPU (rehearsal)" if args.rehearse else torch.cuda.get_device_name()
    out["index_references_s"] = time.perf_counter() - start
    out["cpu_best_images_per_s"] = best_cpu = cpu["best_batched_images_per_s"]
    full: dict[bool, list[Inspection]] = {}
    for half in (False, True):
        name, rates = "half" if half else "float32", {}
        for size in args.gpu_batch_sizes:
            rates[size], full[half], _ = batched(inspector, references, files, size, half)
            print(f"{out['device']} {name} batch {size}: {rates[size]:.1f} images/s", flush=True)
            out[name] = {"images_per_s": rates, "best": max(rates.values())}
            out[f"{name}_vs_cpu"] = out[name]["best"] / best_cpu
            save()
        if not half:
            on_device = full[False][: len(cpu["verdicts"])]  # the files the CPU inspected one at a time
            scores = np.array([r.score for r in on_device])
            out["max_score_difference_vs_cpu"] = float(np.abs(scores - cpu["scores_one_at_a_time"]).max())
            out["verdicts_differing_vs_cpu"] = sum(
                r.is_anomalous != verdict for r, verdict in zip(on_device, cpu["verdicts"], strict=True)
            )
    out["half_vs_float32"] = parity(full[True], full[False])
    save()
    best = max(out["float32"]["images_per_s"], key=out["float32"]["images_per_s"].get)
    rate, in_processes, _ = batched(inspector, references, files, best, processes=args.cpu_threads)
    out["float32_processes"] = {"batch_size": best, "processes": args.cpu_threads, "images_per_s": rate}
    out["float32_processes_vs_threads"] = parity(in_processes, full[False])
    print(f"{out['device']} float32 batch {best}, {args.cpu_threads} worker processes: {rate:.1f} images/s", flush=True)
    save()
    out["tail_images_per_s"] = tail_figures(inspector, references, files[: args.tail_n], args.cpu_threads)
    print(f"per-image tail alone: {out['tail_images_per_s']} images/s", flush=True)


Save = Callable[[], None]


def public(cpu: dict[str, Any]) -> dict[str, Any]:
    """The CPU figures without the per-file lists kept for the device's parity."""
    return {key: value for key, value in cpu.items() if key not in ("scores_one_at_a_time", "verdicts")}


def setup(args: argparse.Namespace, refs: list[Path], load: tuple[float, float, float]) -> dict[str, Any]:
    """What was measured, on what (save() adds the seconds and load average so far)."""
    return {
        "n_files": args.n,
        "one_at_a_time_files": min(args.single, args.n),
        "cells": str(args.cells) if args.cells else f"ELPV test half, {args.cell_type}",
        "references": [str(p) for p in refs],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N for the GPU figures as well")
    parser.add_argument("--rehearse", action="store_true", help="the GPU figures' code, run on the CPU")
    parser.add_argument("--tail-n", type=int, default=256, help="files whose per-image tail is timed alone")
    parser.add_argument("--n", type=int, default=200, help="test files (cycled over the test half's cells)")
    parser.add_argument("--cpu-n", type=int, default=0, help="files the CPU inspects in batches (0: all --n)")
    parser.add_argument("--single", type=int, default=100, help="files inspected one at a time (the first ones)")
    parser.add_argument("--batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[4, 8, 16, 32])
    parser.add_argument("--gpu-batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[64, 128, 256])
    parser.add_argument(
        "--cpu-passes", type=lambda t: [int(v) for v in t.split(",")], default=[], help="CPU backbone pass sizes"
    )
    parser.add_argument("--cpu-threads", type=int, default=torch.get_num_threads(), help="torch threads on the CPU")
    parser.add_argument("--rounds", type=int, default=3, help="alternating CPU rounds (median reported)")
    parser.add_argument("--cell-type", default="mono", choices=("mono", "poly"))
    parser.add_argument("--seed", type=int, default=0, help="reference draw")
    parser.add_argument("--cells", type=Path, default=None, help="a folder --export-cells wrote, instead of ELPV")
    parser.add_argument("--export-cells", type=Path, default=None, help="write --n test cells and the references")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the figures")
    args = parser.parse_args()
    started = time.time()
    load = os.getloadavg()
    if args.export_cells is not None:
        export_cells(args.export_cells, args.cell_type, args.n, args.seed)
        return
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        if args.cells is not None:  # exported by --export-cells (the GPU machine has no ELPV package)
            cells, refs = sorted((args.cells / "test").glob("*.png")), sorted((args.cells / "refs").glob("*.png"))
        else:
            cells, refs = test_cells(args.cell_type), reference_files(args.cell_type, args.seed)
        files = test_files(Path(folder), cells, args.n)
        figures: dict[str, Any] = {"setup": setup(args, refs, load)}

        def save() -> None:
            figures["setup"]["seconds"] = time.time() - started
            figures["setup"]["load_average_after"] = os.getloadavg()
            if args.out is not None:
                write_json_atomic(args.out, {**figures, "cpu": public(figures.get("cpu", {}))})

        figures["decode_images_per_s"] = decode_figures(files[:1000], os.cpu_count() or 1)
        print(f"decode: {figures['decode_images_per_s']}", flush=True)
        figures["cpu"] = cpu_figures(args, files, refs)
        if args.device.startswith("cuda") or args.rehearse:
            device_figures(args, files, refs, figures["cpu"], figures.setdefault("device_path", {}), save)
        save()
    figures["cpu"] = public(figures["cpu"])
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
