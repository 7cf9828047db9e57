"""ELPV, every method side by side (issue 8 figures): the 4-shot Inspector and the four baselines, one run.

Runs `anomalygpt eval --dataset elpv --method all --shots 4` (per seed, 30% of the good cells are held out for
testing, every baseline trains on all the other good cells, the Inspector draws its 4 references from them), then
prints the comparison table: I-AUROC, false alarms and recall at each method's own threshold, training time and
ms per image, per cell type and averaged. The run is resumable (its cache is in --out).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_methods.py --seeds 0 --out runs/bench_methods
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from anomalygpt.io import write_text_atomic
from eval.cli import main as eval_main

COLUMNS = (  # title, metric, format
    ("I-AUROC", "auroc", "{:.3f}"),
    ("false alarms", "false_alarm_rate", "{:.1%}"),
    ("recall", "recall", "{:.1%}"),
    ("training s", "fit_seconds", "{:.1f}"),
    ("ms/image", "ms_per_image", "{:.0f}"),
)


def value(block: dict[str, Any], metric: str, fmt: str) -> str:
    stats = block["summary"][metric]
    if stats is None:
        return "—"
    text = fmt.format(stats["mean"])
    return text + (f" ± {fmt.format(stats['std'])}" if stats["n"] > 1 else "")


def table(document: dict[str, Any]) -> str:
    """One row per (cell type or mean, method)."""
    lines = ["| cells | method | " + " | ".join(t for t, _, _ in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    groups = [*document["categories"].items(), ("mean", document["mean"])]
    for name, rows in groups:
        for label, block in rows.items():
            method = f"inspector, {label.removeprefix('k=')} refs" if label.startswith("k=") else label
            cells = " | ".join(value(block, metric, fmt) for _, metric, fmt in COLUMNS)
            lines.append(f"| {name} | {method} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated split/draw seeds (default 0)")
    parser.add_argument("--method", default="all", help="as anomalygpt eval --method (default all)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_methods"))
    args = parser.parse_args()
    load_start, start = os.getloadavg()[0], time.perf_counter()
    argv = ["--dataset", "elpv", "--method", args.method, "--shots", "4", "--seeds", args.seeds, "--out", str(args.out)]
    code = eval_main(argv)
    if code != 0:
        return code
    document = json.loads((args.out / "results.json").read_text())
    text = (
        f"Command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python bench/bench_methods.py "
        f"--seeds {args.seeds} --method {args.method} --out {args.out}\n"
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs; 1-min load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; wall time {time.perf_counter() - start:.0f} s "
        f"({document['settings_computed']} settings computed, {document['settings_reused']} reused)\n\n"
        + table(document)
        + "\n"
    )
    write_text_atomic(args.out / "methods.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
