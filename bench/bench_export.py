"""Exported runtimes against the torch path on ELPV (issue 22): CPU speed per image, score parity, int8 parity loss.

Per cell type: --refs good cells from the development half (odd-numbered) are fitted into a profile with the
default preset; the profile is exported to ONNX and OpenVINO IR (`anomalygpt.export`); --queries cells from the
test half (even-numbered; good and defective in the half's proportions) are inspected from decoded pixels by
the torch Inspector, the onnxruntime runtime, the OpenVINO runtime, and OpenVINO int8: the IR quantised after
training by nncf, calibrated on the references alone (their 8 rotations/flips; the resize MatMuls stay float).
Reported: ms per image from decoded pixels to the Inspection (after 3 warm-up images, each image through every
runtime in turn, all on --threads CPU threads), the largest and mean score difference from torch, verdict
agreement with torch, and image AUROC. The exported runtimes are also timed batched (`inspect_many`, 16 images
per engine call), each alone after the rest.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_export.py --out runs/bench_export
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from anomalygpt.export import ExportOptions, export_profile
from anomalygpt.inspection import build_inspector
from anomalygpt.io import load_image, write_json_atomic
from anomalygpt.runtime import RuntimeInspector
from anomalygpt.runtime.bundle import read_bundle
from anomalygpt.runtime.engines import openvino_model_engine
from anomalygpt.verdict import standardized
from eval.datasets import ELPV_TYPES, elpv_half, load_split

WARM_UP = 3
BATCH = 16  # images per engine call in the runtime's batched rows


def cells(cell: str, half: str) -> tuple[list[Path], list[int]]:
    """Every cell of the type in the half and its label (1 defective); good cells first."""
    split = elpv_half(load_split("elpv", None, cell), half)
    tested = {sample.path for sample in split.test}
    goods = [p for p in sorted(split.reference_pool) if p not in tested]
    return goods + [s.path for s in split.test], [0] * len(goods) + [int(s.label) for s in split.test]


def draw(cell: str, n_refs: int, n_queries: int, seed: int) -> tuple[list[Path], list[Path], np.ndarray]:
    """References from the dev half's good cells; queries from the test half in its defect share."""
    rng = np.random.default_rng(seed)
    dev_paths, dev_labels = cells(cell, "dev")
    goods = [p for p, label in zip(dev_paths, dev_labels, strict=True) if label == 0]
    refs = [goods[i] for i in sorted(rng.choice(len(goods), n_refs, replace=False))]
    paths, labels = cells(cell, "test")
    chosen = sorted(rng.choice(len(paths), n_queries, replace=False))
    return refs, [paths[i] for i in chosen], np.array([labels[i] for i in chosen])


def timed_round_robin(
    inspectors: dict[str, Callable[[np.ndarray], Any]], images: Sequence[np.ndarray]
) -> dict[str, tuple[list[Any], float]]:
    """Per runtime, its results and mean ms per image after WARM_UP untimed images. Each image goes through every
    runtime in turn, so that load from other processes falls on all of them alike."""
    for image in images[:WARM_UP]:
        for inspect in inspectors.values():
            inspect(image)
    results: dict[str, list[Any]] = {name: [] for name in inspectors}
    seconds = dict.fromkeys(inspectors, 0.0)
    for image in images:
        for name, inspect in inspectors.items():
            start = time.perf_counter()
            results[name].append(inspect(image))
            seconds[name] += time.perf_counter() - start
    return {name: (results[name], seconds[name] * 1000 / len(images)) for name in inspectors}


def int8_inspector(folder: Path, references: Sequence[np.ndarray], threads: int) -> RuntimeInspector:
    """The OpenVINO runtime with its IR quantised to int8, calibrated on the references' 8 rotations/flips."""
    import nncf
    import openvino as ov

    bundle = read_bundle(folder)
    inputs = [standardized(image) if bundle.memory.standardize else image for image in references]
    views = [
        np.ascontiguousarray(np.rot90(v, k)[None])
        for image in inputs
        for v in (image, image[:, ::-1])
        for k in range(4)
    ]
    model = ov.Core().read_model(str(bundle.model_path()))
    quantized = nncf.quantize(
        model, nncf.Dataset(views), subset_size=len(views), ignored_scope=nncf.IgnoredScope(types=["MatMul"])
    )
    outputs = bundle.manifest["outputs"]
    return RuntimeInspector(
        bundle, openvino_model_engine(quantized, [*outputs["features"], *outputs["prior"]], threads)
    )


def compare(name: str, results: Sequence[Any], baseline: Sequence[Any], labels: np.ndarray, ms: float) -> dict:
    scores = np.array([r.score for r in results])
    base = np.array([r.score for r in baseline])
    return {
        "runtime": name,
        "ms_per_image": round(ms, 1),
        "max_score_diff": float(np.abs(scores - base).max()),
        "mean_score_diff": float(np.abs(scores - base).mean()),
        "verdict_agreement": float(np.mean([r.verdict == b.verdict for r, b in zip(results, baseline, strict=True)])),
        "auroc": float(roc_auc_score(labels, scores)),
        "anomalous": int(sum(r.is_anomalous for r in results)),
    }


def run_cell(cell: str, args: argparse.Namespace, work: Path) -> list[dict]:
    refs, queries, labels = draw(cell, args.refs, args.queries, args.seed)
    inspector = build_inspector("default")
    references = inspector.fit([str(p) for p in refs], class_name="solar cell")
    profile = inspector.save_profile(references, work / f"{cell}.profile", refs)
    inspectors: dict[str, Callable[[np.ndarray], Any]] = {"torch": lambda image: inspector.inspect(image, references)}
    folders = {}
    for engine in ("onnx", "openvino"):
        folders[engine] = export_profile(ExportOptions(profile, engine, work / f"{cell}-{engine}", False)).out
        inspectors[engine] = RuntimeInspector.open(folders[engine], args.threads).inspect
    inspectors["openvino int8"] = int8_inspector(
        folders["openvino"], [load_image(p) for p in refs], args.threads
    ).inspect
    images = [load_image(p) for p in queries]
    timings = timed_round_robin(inspectors, images)
    baseline = timings["torch"][0]
    rows = [compare(name, results, baseline, labels, ms) for name, (results, ms) in timings.items()]
    for engine, folder in folders.items():  # the runtime's batched path, timed alone after the others
        runtime = RuntimeInspector.open(folder, args.threads)
        start = time.perf_counter()
        results = list(runtime.inspect_many(images, batch_size=BATCH))
        ms = (time.perf_counter() - start) * 1000 / len(images)
        rows.append(compare(f"{engine} inspect_many({BATCH})", results, baseline, labels, ms))
    return [{"cell": cell, "defective": int(labels.sum()), **row} for row in rows]


def markdown(rows: Sequence[dict]) -> str:
    lines = [
        "| cell | runtime | ms/image | max score diff | mean score diff | verdicts agree | AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['runtime']} | {r['ms_per_image']} | {r['max_score_diff']:.1e} | "
            f"{r['mean_score_diff']:.1e} | {100 * r['verdict_agreement']:.0f} % | {r['auroc']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=list(ELPV_TYPES), choices=ELPV_TYPES)
    parser.add_argument("--refs", type=int, default=4)
    parser.add_argument("--queries", type=int, default=100, help="per cell type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of every runtime")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        rows = [row for cell in args.cells for row in run_cell(cell, args, Path(work))]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # 1-minute, at start and end
        "threads": args.threads,
        "args": {key: str(value) for key, value in vars(args).items()},
        "rows": rows,
    }
    if args.out is not None:
        write_json_atomic(args.out / "results.json", report)
    print(markdown(rows))
    print(f"load average (1 min) at start and end: {report['load_average']}")


if __name__ == "__main__":
    main()
